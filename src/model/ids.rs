//! Identifiers that say what they hold: [`Did`], [`Nsid`], [`Rkey`], [`Tid`]. Each is a
//! string that passed its syntax check ([`crate::syntax`]) and can only be made by
//! [`parse`](Did::parse), so a value of these types is valid wherever it travels. They read as
//! `&str` (`Deref`), so code that only looks at the text needs no conversion.

use crate::syntax::{is_did, is_nsid, is_rkey, is_tid};
use std::fmt;

/// An identifier that failed its syntax check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a valid {what}")]
pub struct IdError {
    /// Which kind of identifier.
    pub what: &'static str,
    /// The value, cut to 256 bytes.
    pub value: String,
}

fn refused(what: &'static str, s: &str) -> IdError {
    let mut end = s.len().min(256);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    IdError {
        what,
        value: s[..end].to_string(),
    }
}

/// `text` in `buf`'s memory when there is one (its old text is replaced), else in a new string.
pub fn text_in(buf: Option<String>, text: &str) -> String {
    match buf {
        Some(mut b) => {
            b.clear();
            b.push_str(text);
            b
        }
        None => text.to_string(),
    }
}

macro_rules! identifier {
    ($(#[$doc:meta])* $name:ident, $check:path, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// The identifier, if `s` passes the syntax check.
            pub fn parse(s: impl AsRef<str> + Into<String>) -> Result<Self, IdError> {
                if $check(s.as_ref()) {
                    Ok($name(s.into()))
                } else {
                    Err(refused($what, s.as_ref()))
                }
            }

            /// [`parse`](Self::parse) into `buf`'s memory when there is one (its text is
            /// replaced): a decoder that reuses the strings of the event before saves an
            /// allocation and a free.
            pub fn parse_reusing(s: &str, buf: Option<String>) -> Result<Self, IdError> {
                if $check(s) {
                    Ok($name(text_in(buf, s)))
                } else {
                    Err(refused($what, s))
                }
            }

            /// The text.
            pub fn as_str(&self) -> &str {
                &self.0
            }

        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }
    };
}

identifier!(
    /// A DID (`did:plc:…`, `did:web:…`): an account.
    Did,
    is_did,
    "DID"
);
identifier!(
    /// A namespaced identifier: a record's collection (`app.bsky.feed.post`).
    Nsid,
    is_nsid,
    "NSID"
);
identifier!(
    /// A record key.
    Rkey,
    is_rkey,
    "record key"
);
identifier!(
    /// A timestamp identifier: a commit's revision.
    Tid,
    is_tid,
    "TID"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_valid_text_becomes_an_identifier() {
        assert_eq!(
            Did::parse("did:plc:z72i7hdynmk6r22z27h6tvur").unwrap(),
            "did:plc:z72i7hdynmk6r22z27h6tvur"
        );
        assert!(Did::parse("did:x").is_err());
        assert_eq!(
            Nsid::parse("app.bsky.feed.post").unwrap().as_str(),
            "app.bsky.feed.post"
        );
        assert!(Nsid::parse("../../x").is_err());
        assert!(Rkey::parse("3mmoojp7etg2g").is_ok());
        assert!(Rkey::parse("a/b").is_err());
        assert!(Tid::parse("3mmoojp7vgo2g").is_ok());
        assert!(Tid::parse("not-a-tid").is_err());
        let e = Did::parse("x".repeat(1000)).unwrap_err();
        assert_eq!((e.what, e.value.len()), ("DID", 256));
        assert_eq!(Tid::parse("3mmoojp7vgo2g").unwrap().len(), 13);
        let reused = Nsid::parse_reusing("app.bsky.feed.like", Some("a longer text before".into()));
        assert_eq!(reused.unwrap(), "app.bsky.feed.like");
        assert!(Nsid::parse_reusing("../../x", Some(String::new())).is_err());
        assert_eq!(Rkey::parse_reusing("self", None).unwrap(), "self");
    }
}
