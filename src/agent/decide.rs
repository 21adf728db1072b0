//! The one sync decision: from what is known about a target (its pin, the version it serves
//! and that version's integrity, what the reference resolved to, the retained versions) to the
//! next step. Pure: the sync and the dry run both ask it, step by step, adding the facts it
//! asks for (a tag resolved, a manifest fetched, a version re-hashed) until it names an action.

use crate::digest::Digest;

/// What a version directory holds, as far as it was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Integrity {
    /// Not there, or not the files the config asks for, or a file missing or of the wrong size.
    Damaged,
    /// Every file there with its recorded size (a cheap check: `stat`).
    Intact,
    /// Every file re-hashed and equal to its record.
    Verified,
}

/// A version on disk: its ids and how far it is known to be whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// The platform manifest's digest (the version id).
    pub digest: Digest,
    /// What the reference resolved to when it was published (an index, for multi-arch tags).
    pub tag_digest: Digest,
    pub integrity: Integrity,
    /// Its record names a signer the target's signature policy still trusts.
    pub signed: bool,
}

/// The rollback pin as read from the state directory (reading it changes nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pin {
    None,
    /// In force: serve this version, do not follow the reference.
    Active(Digest),
    /// Made under another config: void (a sync removes it, a dry run says so).
    Stale(Digest),
}

/// Everything `decide` looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub pin: Pin,
    /// The version `current` points at.
    pub current: Option<Version>,
    /// The version a pin names (when one is in force).
    pub pinned: Option<Version>,
    /// Re-hash what is served before trusting it (self-repair), not just `stat` it.
    pub verify: bool,
    /// The digest the reference itself names (`repo@sha256:...`), if it does.
    pub reference_digest: Option<Digest>,
    /// What the reference resolves to now (asked of the registry).
    pub tag: Option<Digest>,
    /// The platform manifest the tag leads to (fetched from the registry).
    pub manifest: Option<Digest>,
    /// The retained version of that manifest, if the store has one.
    pub retained: Option<Version>,
    /// The target has a signature policy (`[target.verify]`): nothing is served, switched to
    /// or recorded as up to date before what the tag resolved to is verified as signed.
    pub policy: bool,
    /// The tag digest whose signature was verified in this sync.
    pub signed_tag: Option<Digest>,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    // Facts still needed.
    /// Re-hash the current version (`Facts::current.integrity` becomes Verified or Damaged).
    VerifyCurrent,
    /// Re-hash the pinned version.
    VerifyPinned,
    /// Ask the registry what the reference points at.
    Resolve,
    /// Fetch the manifest (and the platform manifest) the tag points at; look it up in the store.
    FetchManifest,
    /// Re-hash the retained version before it serves again (it sat unwatched on disk).
    VerifyRetained,
    /// Find and verify the signatures of what the tag resolved to (`Facts::signed_tag`; a
    /// failure ends the sync before any blob is fetched).
    VerifySignature,
    // Actions.
    /// What is served is what the reference names: keep it (links and profile checked).
    UpToDate,
    /// Same version, but the tag moved (an index changed for another platform), or its
    /// signature was verified now: record the tag digest and the signer.
    Retag,
    /// Pinned: serve the pinned version (`switch` when it is not current yet).
    ServePinned { switch: bool },
    /// Pinned to a version that is not intact in the store: an error.
    PinnedMissing,
    /// Pinned to a version whose record names no signer the policy trusts: an error.
    PinnedUnverified,
    /// Switch to the retained version of the manifest, without a download.
    Reactivate,
    /// Download the manifest's layers and publish a new version.
    Download,
}

impl Step {
    /// Whether this step is an action (the decision is made).
    pub fn is_action(&self) -> bool {
        !matches!(
            self,
            Step::VerifyCurrent
                | Step::VerifyPinned
                | Step::Resolve
                | Step::FetchManifest
                | Step::VerifyRetained
                | Step::VerifySignature
        )
    }
}

/// Whether a version may serve: intact, and re-hashed when `verify` asks for it. `None` when
/// it must be re-hashed first.
fn usable(v: &Version, verify: bool) -> Option<bool> {
    match (v.integrity, verify) {
        (Integrity::Damaged, _) => Some(false),
        (Integrity::Verified, _) | (Integrity::Intact, false) => Some(true),
        (Integrity::Intact, true) => None,
    }
}

/// The next step for a target.
pub fn decide(f: &Facts) -> Step {
    if let Pin::Active(pin) = &f.pin {
        let Some(v) = f.pinned.as_ref().filter(|v| &v.digest == pin) else {
            return Step::PinnedMissing;
        };
        return match usable(v, f.verify) {
            None => Step::VerifyPinned,
            Some(false) => Step::PinnedMissing,
            Some(true) if f.policy && !v.signed => Step::PinnedUnverified,
            Some(true) => Step::ServePinned {
                switch: f.current.as_ref().is_none_or(|c| &c.digest != pin),
            },
        };
    }
    let current = match f.current.as_ref().map(|c| (c, usable(c, f.verify))) {
        Some((_, None)) => return Step::VerifyCurrent,
        Some((c, Some(true))) => Some(c),
        _ => None,
    };
    // What is served counts as up to date only if it was verified as the policy asks.
    let trusted = |c: &Version| !f.policy || c.signed;
    // A reference pinned by digest that is already served needs no network at all.
    if let (Some(rd), Some(c)) = (&f.reference_digest, current) {
        if &c.tag_digest == rd && trusted(c) {
            return Step::UpToDate;
        }
    }
    let Some(tag) = &f.tag else {
        return Step::Resolve;
    };
    let signature_known = !f.policy || f.signed_tag.as_ref() == Some(tag);
    if let Some(c) = current.filter(|c| &c.tag_digest == tag) {
        return match (trusted(c), signature_known) {
            (true, _) => Step::UpToDate,
            (false, false) => Step::VerifySignature,
            // Served before the policy existed, and signed: record who signed it.
            (false, true) => Step::Retag,
        };
    }
    // Before any manifest beyond the tag's is fetched, and before any blob.
    if !signature_known {
        return Step::VerifySignature;
    }
    let Some(manifest) = &f.manifest else {
        return Step::FetchManifest;
    };
    if current.is_some_and(|c| &c.digest == manifest) {
        return Step::Retag;
    }
    match f.retained.as_ref().filter(|r| &r.digest == manifest) {
        // A retained version is re-hashed before it serves again, whatever `verify` says.
        Some(r) => match usable(r, true) {
            None => Step::VerifyRetained,
            Some(true) => Step::Reactivate,
            Some(false) => Step::Download,
        },
        None => Step::Download,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A digest named by one letter.
    fn d(c: char) -> Digest {
        Digest::of(c.to_string().as_bytes())
    }

    fn v(digest: char, tag: char, integrity: Integrity) -> Option<Version> {
        Some(Version {
            digest: d(digest),
            tag_digest: d(tag),
            integrity,
            signed: false,
        })
    }

    /// A version whose record names a trusted signer.
    fn signed(v: Option<Version>) -> Option<Version> {
        v.map(|v| Version { signed: true, ..v })
    }

    fn facts() -> Facts {
        Facts {
            pin: Pin::None,
            current: None,
            pinned: None,
            verify: false,
            reference_digest: None,
            tag: None,
            manifest: None,
            retained: None,
            policy: false,
            signed_tag: None,
        }
    }

    use Integrity::{Damaged, Intact, Verified};

    #[test]
    fn every_branch_as_a_table() {
        // (what the row shows, facts, next step)
        let rows: Vec<(&str, Facts, Step)> = vec![
            ("nothing known: ask the registry", facts(), Step::Resolve),
            (
                "served version is the tag's",
                Facts {
                    current: v('a', 't', Intact),
                    tag: Some(d('t')),
                    ..facts()
                },
                Step::UpToDate,
            ),
            (
                "tag moved: fetch its manifest",
                Facts {
                    current: v('a', 't', Intact),
                    tag: Some(d('u')),
                    ..facts()
                },
                Step::FetchManifest,
            ),
            (
                "tag moved, same platform manifest: retag",
                Facts {
                    current: v('a', 't', Intact),
                    tag: Some(d('u')),
                    manifest: Some(d('a')),
                    ..facts()
                },
                Step::Retag,
            ),
            (
                "new manifest, nothing retained: download",
                Facts {
                    current: v('a', 't', Intact),
                    tag: Some(d('u')),
                    manifest: Some(d('b')),
                    ..facts()
                },
                Step::Download,
            ),
            (
                "new manifest retained, not yet re-hashed",
                Facts {
                    current: v('a', 't', Intact),
                    tag: Some(d('u')),
                    manifest: Some(d('b')),
                    retained: v('b', 'u', Intact),
                    ..facts()
                },
                Step::VerifyRetained,
            ),
            (
                "retained and re-hashed: reactivate",
                Facts {
                    tag: Some(d('u')),
                    manifest: Some(d('b')),
                    retained: v('b', 'u', Verified),
                    ..facts()
                },
                Step::Reactivate,
            ),
            (
                "retained but damaged: download",
                Facts {
                    tag: Some(d('u')),
                    manifest: Some(d('b')),
                    retained: v('b', 'u', Damaged),
                    ..facts()
                },
                Step::Download,
            ),
            (
                "a bare versions/<id> directory is damaged, not retained",
                Facts {
                    tag: Some(d('u')),
                    manifest: Some(d('b')),
                    retained: v('b', 'u', Damaged),
                    ..facts()
                },
                Step::Download,
            ),
            (
                "damaged current counts as nothing served",
                Facts {
                    current: v('a', 't', Damaged),
                    tag: Some(d('t')),
                    ..facts()
                },
                Step::FetchManifest,
            ),
            (
                "damaged current, tag unchanged: download it again",
                Facts {
                    current: v('a', 't', Damaged),
                    tag: Some(d('t')),
                    manifest: Some(d('a')),
                    ..facts()
                },
                Step::Download,
            ),
            (
                "self-repair: current must be re-hashed first",
                Facts {
                    current: v('a', 't', Intact),
                    verify: true,
                    ..facts()
                },
                Step::VerifyCurrent,
            ),
            (
                "self-repair: re-hashed and fine",
                Facts {
                    current: v('a', 't', Verified),
                    verify: true,
                    tag: Some(d('t')),
                    ..facts()
                },
                Step::UpToDate,
            ),
            (
                "digest-pinned reference already served: offline",
                Facts {
                    current: v('a', 'r', Intact),
                    reference_digest: Some(d('r')),
                    ..facts()
                },
                Step::UpToDate,
            ),
            (
                "digest-pinned reference not served yet: ask",
                Facts {
                    current: v('a', 't', Intact),
                    reference_digest: Some(d('r')),
                    ..facts()
                },
                Step::Resolve,
            ),
            (
                "pinned to the current version",
                Facts {
                    pin: Pin::Active(d('a')),
                    current: v('a', 't', Intact),
                    pinned: v('a', 't', Intact),
                    ..facts()
                },
                Step::ServePinned { switch: false },
            ),
            (
                "pinned to a retained version",
                Facts {
                    pin: Pin::Active(d('b')),
                    current: v('a', 't', Intact),
                    pinned: v('b', 'u', Intact),
                    ..facts()
                },
                Step::ServePinned { switch: true },
            ),
            (
                "pinned, self-repair: re-hash the pinned version",
                Facts {
                    pin: Pin::Active(d('b')),
                    pinned: v('b', 'u', Intact),
                    verify: true,
                    ..facts()
                },
                Step::VerifyPinned,
            ),
            (
                "pinned to a version that is gone",
                Facts {
                    pin: Pin::Active(d('b')),
                    current: v('a', 't', Intact),
                    ..facts()
                },
                Step::PinnedMissing,
            ),
            (
                "pinned to a damaged version",
                Facts {
                    pin: Pin::Active(d('b')),
                    pinned: v('b', 'u', Damaged),
                    ..facts()
                },
                Step::PinnedMissing,
            ),
            (
                "policy: the tag moved, its signature first",
                Facts {
                    current: signed(v('a', 't', Intact)),
                    tag: Some(d('u')),
                    policy: true,
                    ..facts()
                },
                Step::VerifySignature,
            ),
            (
                "policy: signed, then the manifest",
                Facts {
                    current: signed(v('a', 't', Intact)),
                    tag: Some(d('u')),
                    policy: true,
                    signed_tag: Some(d('u')),
                    ..facts()
                },
                Step::FetchManifest,
            ),
            (
                "policy: signed, new manifest: download",
                Facts {
                    tag: Some(d('u')),
                    manifest: Some(d('b')),
                    policy: true,
                    signed_tag: Some(d('u')),
                    ..facts()
                },
                Step::Download,
            ),
            (
                "policy: a verified signature of another tag digest is no signature of this one",
                Facts {
                    tag: Some(d('u')),
                    manifest: Some(d('b')),
                    policy: true,
                    signed_tag: Some(d('t')),
                    ..facts()
                },
                Step::VerifySignature,
            ),
            (
                "policy: nothing served, nothing known: ask, then verify",
                Facts {
                    policy: true,
                    ..facts()
                },
                Step::Resolve,
            ),
            (
                "policy: a retained version re-verified is reactivated only once signed",
                Facts {
                    tag: Some(d('u')),
                    manifest: Some(d('b')),
                    retained: v('b', 'u', Verified),
                    policy: true,
                    signed_tag: Some(d('u')),
                    ..facts()
                },
                Step::Reactivate,
            ),
            (
                "policy: served and signed, tag unchanged: up to date without a check",
                Facts {
                    current: signed(v('a', 't', Intact)),
                    tag: Some(d('t')),
                    policy: true,
                    ..facts()
                },
                Step::UpToDate,
            ),
            (
                "policy added: served unsigned, tag unchanged: verify it",
                Facts {
                    current: v('a', 't', Intact),
                    tag: Some(d('t')),
                    policy: true,
                    ..facts()
                },
                Step::VerifySignature,
            ),
            (
                "policy added: served unsigned, now verified: record the signer",
                Facts {
                    current: v('a', 't', Intact),
                    tag: Some(d('t')),
                    policy: true,
                    signed_tag: Some(d('t')),
                    ..facts()
                },
                Step::Retag,
            ),
            (
                "policy: digest-pinned reference served but unsigned: go online",
                Facts {
                    current: v('a', 'r', Intact),
                    reference_digest: Some(d('r')),
                    policy: true,
                    ..facts()
                },
                Step::Resolve,
            ),
            (
                "policy: digest-pinned reference served and signed: offline",
                Facts {
                    current: signed(v('a', 'r', Intact)),
                    reference_digest: Some(d('r')),
                    policy: true,
                    ..facts()
                },
                Step::UpToDate,
            ),
            (
                "policy: pinned to a version recorded unsigned",
                Facts {
                    pin: Pin::Active(d('b')),
                    pinned: v('b', 'u', Intact),
                    policy: true,
                    ..facts()
                },
                Step::PinnedUnverified,
            ),
            (
                "policy: pinned to a signed version",
                Facts {
                    pin: Pin::Active(d('b')),
                    current: signed(v('a', 't', Intact)),
                    pinned: signed(v('b', 'u', Intact)),
                    policy: true,
                    ..facts()
                },
                Step::ServePinned { switch: true },
            ),
            (
                "a stale pin is no pin",
                Facts {
                    pin: Pin::Stale(d('b')),
                    current: v('a', 't', Intact),
                    tag: Some(d('t')),
                    ..facts()
                },
                Step::UpToDate,
            ),
        ];
        for (what, f, want) in rows {
            assert_eq!(decide(&f), want, "{what}: {f:?}");
        }
    }

    #[test]
    fn only_fact_steps_ask_for_more() {
        assert!(!Step::Resolve.is_action());
        assert!(!Step::VerifyRetained.is_action());
        assert!(!Step::VerifySignature.is_action());
        assert!(Step::PinnedUnverified.is_action());
        assert!(Step::Download.is_action());
        assert!(Step::ServePinned { switch: true }.is_action());
    }
}
