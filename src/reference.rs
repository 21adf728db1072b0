//! Image references, as the distribution spec writes them: `registry/repository:tag` or
//! `registry/repository@sha256:...`, with Docker Hub's defaults, parsed once (in the config) by
//! oci-spec's `Reference` (the grammar the Docker CLI and oci-client use).

pub use oci_spec::distribution::Reference;

/// Parses a reference, with an error that quotes it.
pub fn parse_reference(text: &str) -> Result<Reference, String> {
    text.parse::<Reference>()
        .map_err(|e| format!("{text:?}: {e}"))
}
