//! The cryptography behind Sigstore verification: `sigstore-crypto` asks a provider for hashes
//! and signature checks. Its default provider links aws-lc (a long C build on two cores); this
//! one hands raw-message checks to ring (already rustls's provider here) and the checks over a
//! precomputed digest, which ring does not offer, to RustCrypto's p256 and p384. Nothing here is
//! cryptography of its own: each call goes to one library function.

use ring::signature::{
    UnparsedPublicKey, VerificationAlgorithm, ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA384_ASN1,
    ECDSA_P384_SHA256_ASN1, ECDSA_P384_SHA384_ASN1, ED25519, RSA_PKCS1_2048_8192_SHA256,
    RSA_PKCS1_2048_8192_SHA384, RSA_PKCS1_2048_8192_SHA512, RSA_PSS_2048_8192_SHA256,
    RSA_PSS_2048_8192_SHA384, RSA_PSS_2048_8192_SHA512,
};
use sigstore_verify::crypto::provider::{CryptoProvider, HashContext};
use sigstore_verify::crypto::{Error, Result, SigningScheme};
use sigstore_verify::types::HashAlgorithm;

#[derive(Debug)]
pub(crate) struct RingProvider;

static PROVIDER: RingProvider = RingProvider;

/// Installs the provider once per process (a second call finds it installed).
pub(crate) fn install() {
    let _ = sigstore_verify::crypto::provider::install_default_provider(&PROVIDER);
}

struct RingHash(ring::digest::Context);

impl HashContext for RingHash {
    fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    fn finalize(self: Box<Self>) -> Vec<u8> {
        self.0.finish().as_ref().to_vec()
    }
}

fn ring_algorithm(scheme: SigningScheme) -> Result<&'static dyn VerificationAlgorithm> {
    Ok(match scheme {
        SigningScheme::EcdsaP256Sha256 => &ECDSA_P256_SHA256_ASN1,
        SigningScheme::EcdsaP256Sha384 => &ECDSA_P256_SHA384_ASN1,
        SigningScheme::EcdsaP384Sha256 => &ECDSA_P384_SHA256_ASN1,
        SigningScheme::EcdsaP384Sha384 => &ECDSA_P384_SHA384_ASN1,
        SigningScheme::Ed25519 => &ED25519,
        SigningScheme::RsaPssSha256 => &RSA_PSS_2048_8192_SHA256,
        SigningScheme::RsaPssSha384 => &RSA_PSS_2048_8192_SHA384,
        SigningScheme::RsaPssSha512 => &RSA_PSS_2048_8192_SHA512,
        SigningScheme::RsaPkcs1Sha256 => &RSA_PKCS1_2048_8192_SHA256,
        SigningScheme::RsaPkcs1Sha384 => &RSA_PKCS1_2048_8192_SHA384,
        SigningScheme::RsaPkcs1Sha512 => &RSA_PKCS1_2048_8192_SHA512,
        other => {
            return Err(Error::UnsupportedAlgorithm(format!(
                "{} signatures are not supported",
                other.name()
            )))
        }
    })
}

fn invalid(scheme: SigningScheme) -> Error {
    Error::Verification(format!("{} signature invalid", scheme.name()))
}

impl CryptoProvider for RingProvider {
    fn hash(&self, algorithm: HashAlgorithm) -> Result<Box<dyn HashContext>> {
        let alg = match algorithm {
            HashAlgorithm::Sha2256 => &ring::digest::SHA256,
            HashAlgorithm::Sha2384 => &ring::digest::SHA384,
            HashAlgorithm::Sha2512 => &ring::digest::SHA512,
            other => {
                return Err(Error::UnsupportedAlgorithm(format!(
                    "hash {other:?} is not supported"
                )))
            }
        };
        Ok(Box::new(RingHash(ring::digest::Context::new(alg))))
    }

    fn verify_raw(
        &self,
        scheme: SigningScheme,
        spki_pubkey_bytes: &[u8],
        data: &[u8],
        signature: &[u8],
    ) -> Result<()> {
        UnparsedPublicKey::new(ring_algorithm(scheme)?, spki_pubkey_bytes)
            .verify(data, signature)
            .map_err(|_| invalid(scheme))
    }

    fn verify_prehashed(
        &self,
        scheme: SigningScheme,
        spki_pubkey_bytes: &[u8],
        digest: &[u8],
        signature: &[u8],
    ) -> Result<()> {
        use p256::ecdsa::signature::hazmat::PrehashVerifier;
        let bad_key = |e: &dyn std::fmt::Display| Error::InvalidKey(e.to_string());
        match scheme {
            SigningScheme::EcdsaP256Sha256 | SigningScheme::EcdsaP256Sha384 => {
                let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(spki_pubkey_bytes)
                    .map_err(|e| bad_key(&e))?;
                let sig =
                    p256::ecdsa::Signature::from_der(signature).map_err(|_| invalid(scheme))?;
                key.verify_prehash(digest, &sig)
                    .map_err(|_| invalid(scheme))
            }
            SigningScheme::EcdsaP384Sha256 | SigningScheme::EcdsaP384Sha384 => {
                let key = p384::ecdsa::VerifyingKey::from_sec1_bytes(spki_pubkey_bytes)
                    .map_err(|e| bad_key(&e))?;
                let sig =
                    p384::ecdsa::Signature::from_der(signature).map_err(|_| invalid(scheme))?;
                key.verify_prehash(digest, &sig)
                    .map_err(|_| invalid(scheme))
            }
            other => Err(Error::UnsupportedAlgorithm(format!(
                "{} signatures over a digest are not supported: sign with an ECDSA key",
                other.name()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Signer as _;

    #[test]
    fn raw_and_prehashed_ecdsa_agree() {
        let key = p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).unwrap();
        let public = key.verifying_key().to_encoded_point(false);
        let msg = b"the simple signing payload";
        let sig: p256::ecdsa::Signature = key.sign(msg);
        let der = sig.to_der();
        let p = RingProvider;
        p.verify_raw(
            SigningScheme::EcdsaP256Sha256,
            public.as_bytes(),
            msg,
            der.as_bytes(),
        )
        .unwrap();
        let digest = ring::digest::digest(&ring::digest::SHA256, msg);
        p.verify_prehashed(
            SigningScheme::EcdsaP256Sha256,
            public.as_bytes(),
            digest.as_ref(),
            der.as_bytes(),
        )
        .unwrap();
        assert!(p
            .verify_raw(
                SigningScheme::EcdsaP256Sha256,
                public.as_bytes(),
                b"other",
                der.as_bytes()
            )
            .is_err());
        let other = ring::digest::digest(&ring::digest::SHA256, b"other");
        assert!(p
            .verify_prehashed(
                SigningScheme::EcdsaP256Sha256,
                public.as_bytes(),
                other.as_ref(),
                der.as_bytes()
            )
            .is_err());
    }
}
