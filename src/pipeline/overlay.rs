//! The merged view of an image's layers, as container runtimes build it, and the resolution of
//! a wanted path through it.
//!
//! The rules are the OCI image spec's "applying changesets", as containers/storage applies
//! them: an entry in an upper layer replaces whatever the lower layers have at its path; a
//! non-directory (file, symlink, hard link, device) at P hides everything below P; a directory
//! over a lower non-directory replaces it, and merges with a lower directory; `.wh.NAME` deletes
//! NAME, `.wh..wh..opq` hides the lower contents of its directory. An entry implies that its
//! parent directories are directories in its layer.
//!
//! Paths are resolved through symlinks inside the image root only, as `openat2(RESOLVE_IN_ROOT)`
//! or a chroot would: `..` stops at the root and absolute targets start there, so nothing
//! outside the image is ever named. A hard link is the content its target had when its layer
//! was applied: the target's topmost entry in that layer or below.
//!
//! Everything here is pure, over indexes of the layers read so far (top first), so the walk can
//! ask after every layer whether it may stop, and the tests can pose any layering.

use std::collections::{HashMap, HashSet};

/// Linux's limit on symlinks followed in one lookup (MAXSYMLINKS).
pub(crate) const MAX_HOPS: usize = 40;

/// What a layer has at one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Node {
    Dir,
    File {
        size: u64,
    },
    /// The target as written in the layer (relative to the link's directory, or absolute).
    Symlink(Box<str>),
    /// The target, an archive path (already normalised).
    Hardlink(Box<str>),
    /// A device node, FIFO or other entry that can never be published; says which.
    Other(&'static str),
}

impl Node {
    fn is_dir(&self) -> bool {
        matches!(self, Node::Dir)
    }
}

/// Every path one layer mentions, with its whiteouts: what resolution needs to know of it.
/// Memory grows with the number of entries (about 100 bytes each), not with their content.
#[derive(Debug, Default, Clone)]
pub(crate) struct LayerIndex {
    nodes: HashMap<Box<str>, Node>,
    /// Paths deleted (with everything below) from the layers below by `.wh.` markers.
    deleted: HashSet<Box<str>>,
    /// Directories whose lower-layer contents are hidden (`""` is the root).
    opaque: HashSet<Box<str>>,
}

impl LayerIndex {
    /// Records an entry; a later entry at the same path replaces an earlier one, as extraction
    /// does. Its parents become directories of this layer unless the layer says otherwise.
    pub(crate) fn add(&mut self, path: &str, node: Node) {
        self.add_parents(path);
        self.nodes.insert(path.into(), node);
    }

    /// A `.wh.NAME` marker: `path` is deleted from the layers below.
    pub(crate) fn whiteout(&mut self, path: &str) {
        self.add_parents(path);
        self.deleted.insert(path.into());
    }

    /// A `.wh..wh..opq` marker in `dir` (`""` for the root).
    pub(crate) fn opaque(&mut self, dir: &str) {
        if !dir.is_empty() {
            self.add_parents(dir);
            self.nodes.entry(dir.into()).or_insert(Node::Dir);
        }
        self.opaque.insert(dir.into());
    }

    fn add_parents(&mut self, path: &str) {
        for parent in ancestors(path) {
            if self.nodes.contains_key(parent) {
                // Parents were recorded with the first entry below them (or said otherwise).
                break;
            }
            self.nodes.insert(parent.into(), Node::Dir);
        }
    }

    pub(crate) fn get(&self, path: &str) -> Option<&Node> {
        self.nodes.get(path)
    }

    pub(crate) fn is_opaque(&self, dir: &str) -> bool {
        self.opaque.contains(dir)
    }

    /// Every entry of the layer, in no particular order.
    pub(crate) fn entries(&self) -> impl Iterator<Item = (&str, &Node)> {
        self.nodes.iter().map(|(p, n)| (&**p, n))
    }
}

/// The strict ancestors of `path`, nearest first: `a/b/c` gives `a/b`, `a`.
fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    let mut rest = path;
    std::iter::from_fn(move || {
        let (parent, _) = rest.rsplit_once('/')?;
        rest = parent;
        Some(parent)
    })
}

/// The strict ancestors of `path`, root side first.
fn ancestors_from_root(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('/').map(move |(i, _)| &path[..i])
}

/// Why nothing is at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Gone {
    /// No layer has it.
    NotInImage,
    /// Deleted by a whiteout in this layer (0 = top).
    Whiteout { layer: usize },
    /// Hidden by an opaque directory in this layer.
    Opaque { layer: usize, dir: String },
    /// Below a non-directory of this layer (a file or a link that replaced a directory).
    UnderNonDir { layer: usize, path: String },
}

/// What the merged view holds at one path.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Seen<'a> {
    Node {
        layer: usize,
        node: &'a Node,
    },
    Gone(Gone),
    /// The layers read so far do not decide: lower ones might.
    Open,
}

/// The layers of an image read so far, top first, and whether that is all of them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct View<'a> {
    pub layers: &'a [&'a LayerIndex],
    /// Whether `layers` are all the image has (then nothing is left open).
    pub complete: bool,
    /// Index of `layers[0]` in the whole image (for hard links, which look from their layer down).
    pub offset: usize,
}

impl<'a> View<'a> {
    pub(crate) fn new(layers: &'a [&'a LayerIndex], complete: bool) -> View<'a> {
        View {
            layers,
            complete,
            offset: 0,
        }
    }

    /// The same image seen from `layer` (an absolute index) down.
    fn below_layer(&self, layer: usize) -> View<'a> {
        let start = layer.saturating_sub(self.offset).min(self.layers.len());
        View {
            layers: &self.layers[start..],
            complete: self.complete,
            offset: self.offset + start,
        }
    }

    /// The topmost entry at `path` (no links followed).
    pub(crate) fn seen(&self, path: &str) -> Seen<'a> {
        for (i, layer) in self.layers.iter().enumerate() {
            let at = self.offset + i;
            // An entry under a non-directory of this same layer is not reachable.
            for a in ancestors_from_root(path) {
                if layer.get(a).is_some_and(|n| !n.is_dir()) {
                    return Seen::Gone(Gone::UnderNonDir {
                        layer: at,
                        path: a.to_string(),
                    });
                }
            }
            if let Some(node) = layer.get(path) {
                return Seen::Node { layer: at, node };
            }
            if layer.deleted.contains(path) || ancestors(path).any(|a| layer.deleted.contains(a)) {
                return Seen::Gone(Gone::Whiteout { layer: at });
            }
            if let Some(dir) = std::iter::once("")
                .chain(ancestors_from_root(path))
                .find(|d| layer.opaque.contains(*d))
            {
                return Seen::Gone(Gone::Opaque {
                    layer: at,
                    dir: dir.to_string(),
                });
            }
        }
        if self.complete {
            Seen::Gone(Gone::NotInImage)
        } else {
            Seen::Open
        }
    }
}

/// Where a wanted path leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Resolved {
    /// A regular file: the content of the entry at `path` in `layer`.
    File {
        layer: usize,
        path: String,
        size: u64,
        /// The links followed on the way, as `link -> target` (for logs and errors).
        via: Vec<String>,
    },
    /// A directory, at `path` after links.
    Dir { path: String, via: Vec<String> },
    /// Nothing there (`path` is where the lookup ended).
    Missing {
        path: String,
        gone: Gone,
        via: Vec<String>,
    },
    /// Something there that is not published: a device, a loop, a file used as a directory.
    Refused {
        path: String,
        reason: String,
        via: Vec<String>,
    },
    /// Lower layers decide: the lookup waits at `path` (the whole remaining path).
    Open { path: String },
}

/// Joins a symlink target to the directory holding the link, inside the image root: absolute
/// targets start at the root, `..` at the root stays there, `.` and empty parts vanish.
pub(crate) fn join_in_root(dir: &str, target: &str) -> String {
    let mut parts: Vec<&str> = if target.starts_with('/') {
        Vec::new()
    } else {
        dir.split('/').filter(|p| !p.is_empty()).collect()
    };
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    parts.join("/")
}

fn parent_of(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(p, _)| p)
}

/// Resolves `path` through the view: symlinks are followed (inside the root), hard links lead to
/// their target as it was in their layer.
pub(crate) fn resolve(view: &View<'_>, path: &str) -> Resolved {
    let mut via = Vec::new();
    resolve_inner(view, path, &mut via, 0)
}

fn resolve_inner(view: &View<'_>, path: &str, via: &mut Vec<String>, mut hops: usize) -> Resolved {
    let mut remaining = path.to_string();
    'restart: loop {
        let parts: Vec<String> = remaining
            .split('/')
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect();
        if parts.is_empty() {
            return Resolved::Dir {
                path: String::new(),
                via: via.clone(),
            };
        }
        let mut cur = String::new();
        for (i, part) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            let next = if cur.is_empty() {
                part.clone()
            } else {
                format!("{cur}/{part}")
            };
            let rest = || parts[i + 1..].join("/");
            match view.seen(&next) {
                Seen::Open => {
                    let tail = rest();
                    return Resolved::Open {
                        path: if tail.is_empty() {
                            next
                        } else {
                            format!("{next}/{tail}")
                        },
                    };
                }
                Seen::Gone(gone) => {
                    return Resolved::Missing {
                        path: next,
                        gone,
                        via: via.clone(),
                    }
                }
                Seen::Node {
                    node: Node::Dir, ..
                } => {
                    if last {
                        return Resolved::Dir {
                            path: next,
                            via: via.clone(),
                        };
                    }
                    cur = next;
                }
                Seen::Node {
                    layer,
                    node: Node::File { size },
                } => {
                    if last {
                        return Resolved::File {
                            layer,
                            path: next,
                            size: *size,
                            via: via.clone(),
                        };
                    }
                    return Resolved::Missing {
                        path: format!("{next}/{}", rest()),
                        gone: Gone::UnderNonDir { layer, path: next },
                        via: via.clone(),
                    };
                }
                Seen::Node {
                    node: Node::Symlink(target),
                    ..
                } => {
                    hops += 1;
                    if hops > MAX_HOPS {
                        return too_many(&next, via);
                    }
                    let resolved = join_in_root(parent_of(&next), target);
                    via.push(format!("symlink {next} -> {target}"));
                    let tail = rest();
                    remaining = if tail.is_empty() {
                        resolved
                    } else {
                        format!("{resolved}/{tail}")
                    };
                    continue 'restart;
                }
                Seen::Node {
                    layer,
                    node: Node::Hardlink(target),
                } => {
                    if !last {
                        return Resolved::Missing {
                            path: format!("{next}/{}", rest()),
                            gone: Gone::UnderNonDir { layer, path: next },
                            via: via.clone(),
                        };
                    }
                    hops += 1;
                    if hops > MAX_HOPS {
                        return too_many(&next, via);
                    }
                    via.push(format!("hard link {next} => {target}"));
                    // The target as it was when this layer was applied: this layer and below.
                    let below = view.below_layer(layer);
                    return match resolve_inner(&below, target, via, hops) {
                        Resolved::Dir { path, via } => Resolved::Refused {
                            reason: "a hard link to a directory".into(),
                            path,
                            via,
                        },
                        other => other,
                    };
                }
                Seen::Node {
                    node: Node::Other(what),
                    ..
                } => {
                    return Resolved::Refused {
                        path: next,
                        reason: format!("a {what}, not a regular file"),
                        via: via.clone(),
                    }
                }
            }
        }
        // Every part was a directory: the loop returned at the last one.
        return Resolved::Dir {
            path: remaining,
            via: via.clone(),
        };
    }
}

fn too_many(path: &str, via: &[String]) -> Resolved {
    Resolved::Refused {
        path: path.to_string(),
        reason: format!("more than {MAX_HOPS} links followed (a link loop)"),
        via: via.to_vec(),
    }
}

/// The entries that make up directory `dir` in the merged view: every visible non-directory
/// strictly below it, with its path and the node the merged view shows there.
pub(crate) fn listing<'a>(view: &View<'a>, dir: &str) -> Vec<(String, usize, &'a Node)> {
    let prefix = if dir.is_empty() {
        String::new()
    } else {
        format!("{dir}/")
    };
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for layer in view.layers {
        for (path, node) in layer.entries() {
            if !path.starts_with(&prefix) || node.is_dir() || !seen.insert(path) {
                continue;
            }
            if let Seen::Node { layer: at, node } = view.seen(path) {
                if !node.is_dir() {
                    out.push((path.to_string(), at, node));
                }
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A layer from a compact description: `path` = file, `path/` = directory,
    /// `path -> target` = symlink, `path => target` = hard link, `-path` = whiteout,
    /// `dir/*` = opaque, `!path` = a FIFO.
    fn layer(spec: &[&str]) -> LayerIndex {
        let mut l = LayerIndex::default();
        for s in spec {
            if let Some((p, t)) = s.split_once(" -> ") {
                l.add(p, Node::Symlink(t.into()));
            } else if let Some((p, t)) = s.split_once(" => ") {
                l.add(p, Node::Hardlink(t.into()));
            } else if let Some(p) = s.strip_prefix('-') {
                l.whiteout(p);
            } else if let Some(d) = s.strip_suffix("/*") {
                l.opaque(d);
            } else if s == &"*" {
                l.opaque("");
            } else if let Some(p) = s.strip_prefix('!') {
                l.add(p, Node::Other("FIFO"));
            } else if let Some(d) = s.strip_suffix('/') {
                l.add(d, Node::Dir);
            } else {
                l.add(
                    s,
                    Node::File {
                        size: s.len() as u64,
                    },
                );
            }
        }
        l
    }

    /// What `path` resolves to, as a short string: `file@LAYER:PATH`, `dir:PATH`,
    /// `missing:PATH`, `refused:PATH`, `open:PATH`.
    fn outcome(layers: &[LayerIndex], complete: bool, path: &str) -> String {
        let refs: Vec<&LayerIndex> = layers.iter().collect();
        match resolve(&View::new(&refs, complete), path) {
            Resolved::File { layer, path, .. } => format!("file@{layer}:{path}"),
            Resolved::Dir { path, .. } => format!("dir:{path}"),
            Resolved::Missing { path, .. } => format!("missing:{path}"),
            Resolved::Refused { path, .. } => format!("refused:{path}"),
            Resolved::Open { path } => format!("open:{path}"),
        }
    }

    #[test]
    fn changeset_rules_as_a_table() {
        // (layers top first, path, all layers known, expected)
        let table: &[(&[&[&str]], &str, bool, &str)] = &[
            // plain file, and the upper one of two
            (&[&["a/k"]], "a/k", true, "file@0:a/k"),
            (&[&["a/k"], &["a/k"]], "a/k", true, "file@0:a/k"),
            (&[&["x"], &["a/k"]], "a/k", true, "file@1:a/k"),
            // nothing: decided only once all layers are known
            (&[&["x"]], "a/k", false, "open:a/k"),
            (&[&["x"]], "a/k", true, "missing:a"),
            // whiteouts and opaque directories hide what is below them only
            (&[&["-a/k"], &["a/k"]], "a/k", false, "missing:a/k"),
            (&[&["-a"], &["a/k"]], "a/k", false, "missing:a"),
            (&[&["a/k", "-a/k"], &["a/k"]], "a/k", true, "file@0:a/k"),
            (&[&["a/*"], &["a/k"]], "a/k", false, "missing:a/k"),
            (&[&["*"], &["a/k"]], "a/k", false, "missing:a"),
            (&[&["a/*", "a/k"], &["a/k"]], "a/k", true, "file@0:a/k"),
            // a directory replaced by a symlink (buildah: rm -rf a; ln -s nowhere a)
            (
                &[&["a -> nowhere"], &["a/b"]],
                "a/b",
                true,
                "missing:nowhere",
            ),
            // ... or by a file (umoci insert FILE /a)
            (&[&["a"], &["a/b"]], "a/b", true, "missing:a/b"),
            // a directory over a lower file replaces it; lower directories merge
            (&[&["a/"], &["a"]], "a", true, "dir:a"),
            (&[&["a/x"], &["a/b"]], "a/b", true, "file@1:a/b"),
            (&[&["a/"], &["a"], &["a/b"]], "a/b", true, "missing:a/b"),
            // symlinks, relative and absolute, resolved inside the root
            (
                &[&["b/vmlinuz -> vmlinuz-6.1", "b/vmlinuz-6.1"]],
                "b/vmlinuz",
                true,
                "file@0:b/vmlinuz-6.1",
            ),
            (
                &[&["b/k -> /boot/k"], &["boot/k"]],
                "b/k",
                true,
                "file@1:boot/k",
            ),
            (
                &[&["b/k -> ../../../../boot/k", "boot/k"]],
                "b/k",
                true,
                "file@0:boot/k",
            ),
            (&[&["b/k -> /etc/shadow"]], "b/k", true, "missing:etc"),
            (
                &[&["usr/install -> /opt/i"], &["opt/i/k"]],
                "usr/install/k",
                true,
                "file@1:opt/i/k",
            ),
            // a link found in a lower layer leads to a path an upper layer holds
            (
                &[&["opt/i/k"], &["usr/install -> /opt/i"]],
                "usr/install/k",
                true,
                "file@0:opt/i/k",
            ),
            // an upper layer's files under a path that is a link below: the upper directory wins
            (
                &[&["assets/talos/k"], &["assets/talos -> /tmp/x"]],
                "assets/talos/k",
                true,
                "file@0:assets/talos/k",
            ),
            // entries under a link of the same layer are unreachable
            (&[&["a -> /x", "a/k"]], "a/k", true, "missing:x"),
            // loops and devices are refused
            (&[&["a -> b", "b -> a"]], "a", true, "refused:a"),
            (&[&["!a/fifo"]], "a/fifo", true, "refused:a/fifo"),
            // hard links: to an earlier entry of the same layer, or to a lower layer's file
            (
                &[&["u/k => boot/k", "boot/k"]],
                "u/k",
                true,
                "file@0:boot/k",
            ),
            (
                &[&["u/k => boot/k"], &["boot/k"]],
                "u/k",
                true,
                "file@1:boot/k",
            ),
            // ... as it was when the link's layer was applied, not as an upper layer changed it
            (
                &[&["boot/k"], &["u/k => boot/k"], &["boot/k"]],
                "u/k",
                true,
                "file@2:boot/k",
            ),
            (&[&["u/k => boot/k"]], "u/k", true, "missing:boot"),
            (&[&["u/k => boot"], &["boot/"]], "u/k", true, "refused:boot"),
            // a file used as a directory
            (&[&["a", "b -> a/k"]], "b", true, "missing:a/k"),
        ];
        for (i, (layers, path, complete, want)) in table.iter().enumerate() {
            let layers: Vec<LayerIndex> = layers.iter().map(|l| layer(l)).collect();
            assert_eq!(
                outcome(&layers, *complete, path),
                *want,
                "case {i}: {layers:?} {path}"
            );
        }
    }

    #[test]
    fn an_open_lookup_names_the_rewritten_path() {
        let layers = [layer(&["usr/install -> /opt/i"])];
        assert_eq!(outcome(&layers, false, "usr/install/k"), "open:opt/i/k");
    }

    #[test]
    fn links_followed_are_reported() {
        let l = [layer(&["a/vmlinuz -> v1", "a/v1 => boot/k", "boot/k"])];
        let refs: Vec<&LayerIndex> = l.iter().collect();
        match resolve(&View::new(&refs, true), "a/vmlinuz") {
            Resolved::File { via, path, .. } => {
                assert_eq!(path, "boot/k");
                assert_eq!(via, ["symlink a/vmlinuz -> v1", "hard link a/v1 => boot/k"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn roots_and_dots_stay_inside() {
        assert_eq!(join_in_root("a/b", "../../../../etc"), "etc");
        assert_eq!(join_in_root("a/b", "/x/./y//z"), "x/y/z");
        assert_eq!(join_in_root("a", "c"), "a/c");
        assert_eq!(join_in_root("", ".."), "");
    }

    #[test]
    fn directory_listings_follow_the_merged_view() {
        let layers = [
            layer(&["d/new", "-d/gone", "d/sub -> ../x"]),
            layer(&["d/old", "d/gone", "d/sub/y"]),
        ];
        let refs: Vec<&LayerIndex> = layers.iter().collect();
        let got: Vec<(String, usize)> = listing(&View::new(&refs, true), "d")
            .into_iter()
            .map(|(p, l, _)| (p, l))
            .collect();
        assert_eq!(
            got,
            [
                ("d/new".to_string(), 0),
                ("d/old".to_string(), 1),
                ("d/sub".to_string(), 0)
            ]
        );
    }
}
