//! Prometheus metrics, served at `/metrics` in the text format.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::digest::Digest;
use crate::registry::Observer;
use crate::store::VersionManifest;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    pub target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub target: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PublishedLabels {
    pub target: String,
    pub digest: String,
    /// Who signed it (`unverified` without a signature policy).
    pub signed_by: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HostLabels {
    pub host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub host: String,
    pub kind: String,
    /// HTTP status, or "error" when no response came.
    pub code: String,
}

pub struct Metrics {
    registry: Registry,
    syncs: Family<ResultLabels, Counter>,
    duration: Family<TargetLabels, Histogram>,
    bytes: Family<TargetLabels, Counter>,
    last_success: Family<TargetLabels, Gauge<f64, AtomicU64>>,
    failures: Family<TargetLabels, Gauge>,
    published: Family<PublishedLabels, Gauge>,
    repairs: Family<TargetLabels, Counter>,
    hook_failures: Family<TargetLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    host_bytes: Family<HostLabels, Counter>,
    signatures: Family<ResultLabels, Counter>,
    tag_behind: Family<TargetLabels, Gauge>,
    pinned: Family<TargetLabels, Gauge>,
    free_bytes: Family<TargetLabels, Gauge>,
    /// The labels of each target's `published_info` series.
    serving: Mutex<HashMap<String, PublishedLabels>>,
    /// Per target: (what its tag resolved to last, the tag digest of what it serves).
    tags: Mutex<HashMap<String, TagPair>>,
}

/// (what a target's tag resolved to last, the tag digest of what it serves)
type TagPair = (Option<Digest>, Option<Digest>);

fn target(name: &str) -> TargetLabels {
    TargetLabels {
        target: name.to_string(),
    }
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("bootsync");
        let syncs = Family::<ResultLabels, Counter>::default();
        registry.register(
            "syncs",
            "Operations by target and result (published, reactivated, up_to_date, pinned, rolled_back, repaired, fell_back, failed)",
            syncs.clone(),
        );
        let duration = Family::<TargetLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.05, 2.0, 15))
        });
        registry.register(
            "sync_duration_seconds",
            "Duration of syncs",
            duration.clone(),
        );
        let bytes = Family::<TargetLabels, Counter>::default();
        registry.register("downloaded_bytes", "Blob bytes downloaded", bytes.clone());
        let last_success = Family::<TargetLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "last_success_timestamp_seconds",
            "When the target last synced successfully (Unix time)",
            last_success.clone(),
        );
        let failures = Family::<TargetLabels, Gauge>::default();
        registry.register(
            "consecutive_failures",
            "Failed syncs in a row",
            failures.clone(),
        );
        let published = Family::<PublishedLabels, Gauge>::default();
        registry.register(
            "published_info",
            "The digest each target currently serves and who signed it (value 1)",
            published.clone(),
        );
        let repairs = Family::<TargetLabels, Counter>::default();
        registry.register(
            "self_repairs",
            "Served files or links restored after outside changes",
            repairs.clone(),
        );
        let hook_failures = Family::<TargetLabels, Counter>::default();
        registry.register(
            "hook_failures",
            "Post-publish hooks that failed or timed out",
            hook_failures.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "registry_requests",
            "Registry requests by host, kind and status code",
            requests.clone(),
        );
        let host_bytes = Family::<HostLabels, Counter>::default();
        registry.register(
            "registry_bytes",
            "Blob bytes received by host (the registry or one of its mirrors)",
            host_bytes.clone(),
        );
        let signatures = Family::<ResultLabels, Counter>::default();
        registry.register(
            "signature_checks",
            "Signature checks of what a tag resolved to, by target and result (verified, unsigned, rejected)",
            signatures.clone(),
        );
        let tag_behind = Family::<TargetLabels, Gauge>::default();
        registry.register(
            "tag_behind",
            "1 while the tag resolves to something other than what the target serves (a release not yet published, a pin, a failing sync)",
            tag_behind.clone(),
        );
        let pinned = Family::<TargetLabels, Gauge>::default();
        registry.register(
            "pinned",
            "1 while a rollback pin holds the target",
            pinned.clone(),
        );
        let free_bytes = Family::<TargetLabels, Gauge>::default();
        registry.register(
            "dest_free_bytes",
            "Free bytes of the file system of the target's dest, after its last operation",
            free_bytes.clone(),
        );
        Arc::new(Metrics {
            registry,
            syncs,
            duration,
            bytes,
            last_success,
            failures,
            published,
            repairs,
            hook_failures,
            requests,
            host_bytes,
            signatures,
            tag_behind,
            pinned,
            free_bytes,
            serving: Mutex::default(),
            tags: Mutex::default(),
        })
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn sync_finished(
        &self,
        name: &str,
        result: &str,
        took: Duration,
        consecutive_failures: u32,
    ) {
        self.syncs
            .get_or_create(&ResultLabels {
                target: name.to_string(),
                result: result.to_string(),
            })
            .inc();
        self.duration
            .get_or_create(&target(name))
            .observe(took.as_secs_f64());
        self.failures
            .get_or_create(&target(name))
            .set(consecutive_failures.into());
        if result != "failed" {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            self.last_success
                .get_or_create(&target(name))
                .set(now.as_secs_f64());
        }
    }

    /// Records the version a target serves (none: nothing) and who signed it, replacing the
    /// series of what it served before: one `published_info` series per target.
    /// What the target's tag resolved to.
    pub fn tag_resolved(&self, name: &str, digest: &Digest) {
        let mut tags = self.tags.lock().unwrap_or_else(|e| e.into_inner());
        let entry = tags.entry(name.to_string()).or_default();
        entry.0 = Some(digest.clone());
        self.set_behind(name, entry);
    }

    fn set_behind(&self, name: &str, (tag, served): &TagPair) {
        let behind = matches!((tag, served), (Some(t), s) if Some(t) != s.as_ref());
        self.tag_behind
            .get_or_create(&target(name))
            .set(i64::from(behind));
    }

    pub fn pinned(&self, name: &str, pinned: bool) {
        self.pinned
            .get_or_create(&target(name))
            .set(i64::from(pinned));
    }

    pub fn free_space(&self, name: &str, bytes: u64) {
        self.free_bytes
            .get_or_create(&target(name))
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    pub fn serving(&self, name: &str, served: Option<&VersionManifest>) {
        {
            let mut tags = self.tags.lock().unwrap_or_else(|e| e.into_inner());
            let entry = tags.entry(name.to_string()).or_default();
            entry.1 = served.map(|m| m.tag_digest.clone());
            self.set_behind(name, entry);
        }
        let labels = served.map(|m| PublishedLabels {
            target: name.to_string(),
            digest: m.digest.to_string(),
            signed_by: m
                .signature
                .as_ref()
                .map_or_else(|| "unverified".to_string(), ToString::to_string),
        });
        let mut serving = self.serving.lock().unwrap_or_else(|e| e.into_inner());
        let old = serving.get(name).cloned();
        if old != labels {
            if let Some(old) = old {
                self.published.remove(&old);
            }
            match &labels {
                Some(l) => {
                    serving.insert(name.to_string(), l.clone());
                }
                None => {
                    serving.remove(name);
                }
            }
        }
        if let Some(l) = &labels {
            self.published.get_or_create(l).set(1);
        }
    }

    /// A signature check ended (`verified`, `unsigned`, `rejected`).
    pub fn signature_checked(&self, name: &str, result: &str) {
        self.signatures
            .get_or_create(&ResultLabels {
                target: name.to_string(),
                result: result.to_string(),
            })
            .inc();
    }

    /// Creates a target's counters at zero, so alert rules see them before the first event.
    pub fn register_target(&self, name: &str) {
        let _ = self.repairs.get_or_create(&target(name));
        let _ = self.hook_failures.get_or_create(&target(name));
        let _ = self.bytes.get_or_create(&target(name));
    }

    pub fn self_repaired(&self, name: &str) {
        self.repairs.get_or_create(&target(name)).inc();
    }

    pub fn hook_failed(&self, name: &str) {
        self.hook_failures.get_or_create(&target(name)).inc();
    }

    /// An observer that counts one target's registry requests and downloaded bytes.
    pub fn observer(self: &Arc<Self>, name: &str) -> Arc<dyn Observer> {
        Arc::new(TargetObserver {
            metrics: self.clone(),
            target: name.to_string(),
        })
    }
}

struct TargetObserver {
    metrics: Arc<Metrics>,
    target: String,
}

impl Observer for TargetObserver {
    fn response(&self, host: &str, kind: &'static str, status: u16) {
        let code = if status == 0 {
            "error".to_string()
        } else {
            status.to_string()
        };
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                host: host.to_string(),
                kind: kind.to_string(),
                code,
            })
            .inc();
    }

    fn bytes(&self, host: &str, n: u64) {
        self.metrics
            .bytes
            .get_or_create(&target(&self.target))
            .inc_by(n);
        self.metrics
            .host_bytes
            .get_or_create(&HostLabels {
                host: host.to_string(),
            })
            .inc_by(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tag_that_moved_past_what_is_served_is_behind() {
        let m = Metrics::new();
        let served = crate::digest::Digest::of(b"v1");
        let newer = crate::digest::Digest::of(b"v2");
        let v1 = VersionManifest {
            target: "t".into(),
            reference: "r/t:1".into(),
            platform: "linux/arm64".into(),
            digest: served.clone(),
            tag_digest: served.clone(),
            published_at: String::new(),
            files: Vec::new(),
            boot: None,
            signature: None,
        };
        let behind = |m: &Metrics| {
            m.encode()
                .lines()
                .find(|l| l.starts_with("bootsync_tag_behind{"))
                .map(|l| l.ends_with(" 1"))
        };
        m.tag_resolved("t", &newer);
        assert_eq!(behind(&m), Some(true), "nothing served, tag known");
        m.serving("t", Some(&v1));
        assert_eq!(behind(&m), Some(true), "v1 served, tag at v2");
        m.tag_resolved("t", &served);
        assert_eq!(behind(&m), Some(false), "tag back at v1");
        m.pinned("t", true);
        m.free_space("t", 42);
        let text = m.encode();
        assert!(text.contains("bootsync_pinned{target=\"t\"} 1"), "{text}");
        assert!(
            text.contains("bootsync_dest_free_bytes{target=\"t\"} 42"),
            "{text}"
        );
    }

    #[test]
    fn series_appear_in_the_text_format() {
        let m = Metrics::new();
        m.sync_finished("t", "published", Duration::from_millis(300), 0);
        let version = |content: &[u8], signature: Option<crate::store::Signer>| VersionManifest {
            target: "t".into(),
            reference: "r/t:1".into(),
            platform: "linux/arm64".into(),
            digest: crate::digest::Digest::of(content),
            tag_digest: crate::digest::Digest::of(content),
            published_at: String::new(),
            files: Vec::new(),
            boot: None,
            signature,
        };
        let signer = crate::store::Signer {
            kind: "key".into(),
            key: Some("sha256:ab".into()),
            key_file: Some("/etc/k.pub".into()),
            issuer: None,
            subject: None,
            format: "cosign v2 signature".into(),
            source: "tag".into(),
        };
        let (aa, bb) = (version(b"aa", None), version(b"bb", Some(signer)));
        m.serving("t", Some(&aa));
        m.serving("t", Some(&bb));
        m.signature_checked("t", "verified");
        let (aa, bb) = (aa.digest, bb.digest);
        let o = m.observer("t");
        o.response("ghcr.io", "head", 200);
        o.response("ghcr.io", "blob", 0);
        o.bytes("mirror.site:5000", 42);
        let text = m.encode();
        let bb_line = format!(
            r#"bootsync_published_info{{target="t",digest="{bb}",signed_by="key sha256:ab (/etc/k.pub)"}} 1"#
        );
        for want in [
            r#"bootsync_signature_checks_total{target="t",result="verified"} 1"#,
            r#"bootsync_syncs_total{target="t",result="published"} 1"#,
            bb_line.as_str(),
            r#"bootsync_registry_requests_total{host="ghcr.io",kind="head",code="200"} 1"#,
            r#"bootsync_registry_requests_total{host="ghcr.io",kind="blob",code="error"} 1"#,
            r#"bootsync_downloaded_bytes_total{target="t"} 42"#,
            r#"bootsync_registry_bytes_total{host="mirror.site:5000"} 42"#,
            "bootsync_sync_duration_seconds_bucket",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
        assert!(
            !text.contains(aa.as_str()),
            "old digest still exported:\n{text}"
        );
    }
}
