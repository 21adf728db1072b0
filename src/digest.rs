//! `sha256:<64 lowercase hex>`, parsed once where it enters (a registry header, a manifest, a
//! file on disk, a remote `/status`) and passed on as a type: nothing downstream re-validates or
//! slices strings. Only sha256 is accepted: it is what registries use and what bootsync hashes
//! with.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

const PREFIX: &str = "sha256:";

/// A sha256 content digest.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

/// Why a string is not a digest bootsync accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("unsupported digest algorithm {0:?} (only sha256)")]
    Algorithm(String),
    #[error("malformed digest {0:?}")]
    Malformed(String),
}

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest::from_hasher(Sha256::new_with_prefix(bytes))
    }

    /// The digest a finished hasher holds.
    pub fn from_hasher(hasher: Sha256) -> Digest {
        Digest(format!("{PREFIX}{}", hex::encode(hasher.finalize())))
    }

    /// Parses bare lowercase hex (a version directory's name, a `.bootsync.json` file hash).
    pub fn from_hex(hex: &str) -> Result<Digest, DigestError> {
        format!("{PREFIX}{hex}").parse()
    }

    /// `sha256:<hex>`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.0[PREFIX.len()..]
    }

    /// `sha256:` and the first 12 hex digits, for tables and status lines.
    pub fn short(&self) -> &str {
        &self.0[..PREFIX.len() + 12]
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Digest, DigestError> {
        match s.split_once(':') {
            Some(("sha256", hex))
                if hex.len() == 64
                    && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) =>
            {
                Ok(Digest(s.to_string()))
            }
            Some(("sha256", _)) | None => Err(DigestError::Malformed(s.to_string())),
            Some((alg, _)) => Err(DigestError::Algorithm(alg.to_string())),
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_sha256_digests_parse() {
        let good = format!("sha256:{}", "a".repeat(64));
        let d: Digest = good.parse().unwrap();
        assert_eq!(d.hex(), "a".repeat(64));
        assert_eq!(d.short(), format!("sha256:{}", "a".repeat(12)));
        for (bad, want) in [
            ("sha512:abc".to_string(), "unsupported"),
            ("sha256:ABC".to_string(), "malformed"),
            (format!("sha256:{}", "A".repeat(64)), "malformed"),
            ("sha256:../../../../etc/passwd".to_string(), "malformed"),
            ("nonsense".to_string(), "malformed"),
            (format!("sha256:{}é", "a".repeat(63)), "malformed"),
        ] {
            let e = bad.parse::<Digest>().unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
        assert_eq!(
            Digest::of(b""),
            Digest::from_hex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
                .unwrap()
        );
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
        assert!(serde_json::from_str::<Digest>("\"sha256:zz\"").is_err());
    }
}
