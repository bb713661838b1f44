//! Typed digests.
//!
//! Two different things are 32-byte blake3 hashes in meduet, and mixing them up is a
//! classic cache bug: the *content* of some bytes (a file, a tree of files, a stage's
//! output) and the *key* of a stage execution (what produced an object). They get two
//! distinct types, as buck2 does with `CasDigest<Kind>`, so that a key can never be
//! passed where an output digest is expected.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

macro_rules! digest_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name([u8; 32]);

        impl $name {
            /// Wraps raw digest bytes.
            pub const fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(bytes)
            }

            /// The raw digest bytes.
            pub const fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// The 64-character lowercase hex form (used for folder names and JSON).
            pub fn to_hex(&self) -> String {
                blake3::Hash::from_bytes(self.0).to_hex().to_string()
            }

            /// The first 12 hex characters, for logs and tables.
            pub fn short(&self) -> String {
                self.to_hex()[..12].to_string()
            }

            /// Parses the 64-character hex form.
            pub fn parse_hex(s: &str) -> Result<Self, DigestParseError> {
                blake3::Hash::from_hex(s)
                    .map(|h| Self(*h.as_bytes()))
                    .map_err(|_| DigestParseError(s.to_string()))
            }
        }

        impl From<blake3::Hash> for $name {
            fn from(h: blake3::Hash) -> Self {
                Self(*h.as_bytes())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl FromStr for $name {
            type Err = DigestParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse_hex(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_hex())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse_hex(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

digest_type!(
    /// blake3 of content: one file, a tree of files (Merkle root), or a stage output.
    ContentDigest
);

digest_type!(
    /// The cache key of one stage execution: what produced an object, not what it holds.
    StageKey
);

/// A string that is not 64 hex characters.
#[derive(Debug, thiserror::Error)]
#[error("not a blake3 digest (expected 64 hex characters): '{0}'")]
pub struct DigestParseError(pub String);

impl ContentDigest {
    /// Digest of an in-memory byte string.
    pub fn of_bytes(bytes: &[u8]) -> Self {
        blake3::hash(bytes).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_serde() {
        let d = ContentDigest::of_bytes(b"abc");
        assert_eq!(d.to_hex().len(), 64);
        assert_eq!(ContentDigest::parse_hex(&d.to_hex()).unwrap(), d);
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{}\"", d.to_hex()));
        let back: ContentDigest = serde_json::from_str(&json).unwrap();
        assert_eq!(back, d);
        assert!(StageKey::parse_hex("xyz").is_err());
        assert_eq!(d.short().len(), 12);
    }
}
