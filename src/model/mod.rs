//! The event model shared by both sources, and its Arrow form.
//!
//! [`event`] holds [`Event`] (what happened) and [`Envelope`] (how it arrived).

pub mod event;
pub mod lexicon;
#[cfg(feature = "lake")]
pub mod rows;

pub use event::*;
