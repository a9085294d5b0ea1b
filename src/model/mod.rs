//! The event model shared by both sources, and its Arrow form.
//!
//! [`event`] holds [`Event`] (what happened) and [`Envelope`] (how it arrived).

pub mod cursor;
pub mod event;
pub mod filter;
pub mod ids;
#[cfg(feature = "lake")]
pub mod key;
pub mod lexicon;
#[cfg(feature = "lake")]
pub mod rows;

pub use cursor::{Cursor, TimeWindow};
pub use event::*;
pub use filter::Filters;
pub use ids::{Did, IdError, Nsid, Rkey, Tid};
