//! Who owns what: which nodes are alive ([`Membership`]), where a new owner goes
//! ([`place`]), who owns an object now ([`Directory`]), and the fence a new owner puts in
//! the object's log ([`take_over`]).
//!
//! The directory is a routing hint, not the safety: two nodes may both believe they own an
//! object for a moment (a paused owner whose entry was taken over, say). What keeps them from
//! both writing is the log: a new owner appends a marker that expects the log's current end,
//! and every later append expects the one before it, so the former owner's next append names
//! a stale sequence and is refused ([`crate::fenced`]).

use std::collections::BTreeMap;
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};

use crate::connect::Nats;
use crate::fenced::{AppendError, FencedLog};

/// One run of one node: its configured name and a number drawn at start, so a node that
/// restarts under the same name is a different owner from its former self.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeId {
    pub name: String,
    pub incarnation: u64,
}

impl NodeId {
    /// `name` with a fresh incarnation.
    pub fn start(name: impl Into<String>) -> Self {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        std::time::SystemTime::now().hash(&mut hasher);
        std::process::id().hash(&mut hasher);
        // A per-process random seed too, so two starts in one nanosecond still differ.
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
            .hash(&mut hasher);
        Self {
            name: name.into(),
            incarnation: hasher.finish(),
        }
    }

    fn encode(&self) -> Bytes {
        Bytes::from(format!("{} {}", self.incarnation, self.name))
    }

    fn decode(value: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(value).ok()?;
        let (incarnation, name) = text.split_once(' ')?;
        Some(Self {
            name: name.to_string(),
            incarnation: incarnation.parse().ok()?,
        })
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{:016x}", self.name, self.incarnation)
    }
}

/// A KV key or subject token for any object name: characters outside `[A-Za-z0-9_-]` (the
/// `.` that would split a subject, the `:` and `@` channel names allow) become `=XX`.
pub fn token(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("={byte:02X}"));
        }
    }
    out
}

/// The nodes that are alive: each keeps an entry in a bucket whose entries expire after
/// `ttl`, rewritten every quarter of it; a node that stops (killed, paused, cut off) drops
/// out once its entry expires.
///
/// Each node also watches the bucket, so [`Membership::alive`] answers from memory: a node
/// is alive while its latest announcement is younger than `ttl`.
#[derive(Debug)]
pub struct Membership {
    me: NodeId,
    nodes: kv::Store,
    ttl: Duration,
    /// What the watch task saw of the bucket.
    seen: Arc<Mutex<Seen>>,
    heartbeat: tokio::task::JoinHandle<()>,
    watch: tokio::task::JoinHandle<()>,
}

/// Where cluster mode keeps its membership and directory.
#[derive(Debug, Clone)]
pub struct DirectorySpec {
    /// Prefix of the two buckets' names (`{prefix}_nodes`, `{prefix}_owners`).
    pub prefix: String,
    pub replicas: usize,
    /// How long a silent node counts as alive.
    pub node_ttl: Duration,
}

/// A failure of a membership or directory operation.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct DirectoryError {
    what: String,
    #[source]
    source: async_nats::Error,
}

impl DirectoryError {
    pub(crate) fn new(what: impl Into<String>, source: impl Into<async_nats::Error>) -> Self {
        Self {
            what: what.into(),
            source: source.into(),
        }
    }
}

pub(crate) async fn bucket(
    nats: &Nats,
    name: String,
    replicas: usize,
    max_age: Duration,
) -> Result<kv::Store, DirectoryError> {
    let js = async_nats::jetstream::new(nats.client.clone());
    js.create_or_update_key_value(kv::Config {
        bucket: name.clone(),
        history: 1,
        max_age,
        num_replicas: replicas,
        ..kv::Config::default()
    })
    .await
    .map_err(|e| DirectoryError::new(format!("opening bucket {name}"), e))
}

impl Membership {
    /// Announces `me` and keeps announcing it until dropped.
    pub async fn join(
        nats: &Nats,
        spec: &DirectorySpec,
        me: NodeId,
    ) -> Result<Self, DirectoryError> {
        let nodes = bucket(
            nats,
            format!("{}_nodes", spec.prefix),
            spec.replicas,
            spec.node_ttl,
        )
        .await?;
        nodes
            .put(token(&me.name), me.encode())
            .await
            .map_err(|e| DirectoryError::new(format!("announcing node {me}"), e))?;
        let every = heartbeat_every(spec.node_ttl);
        // When this node's last heartbeat was written (ms since the epoch, this clock).
        let written = Arc::new(AtomicU64::new(now_ms()));
        let (store, key, value) = (nodes.clone(), token(&me.name), me.encode());
        let wrote = written.clone();
        let heartbeat = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                match store.put(&key, value.clone()).await {
                    Ok(_) => wrote.store(now_ms(), Ordering::Relaxed),
                    Err(e) => tracing::warn!(error = %e, "node heartbeat not written; retrying"),
                }
            }
        });
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (mine, ttl) = (me.clone(), spec.node_ttl);
        // With history: the nodes announced before this one joined, then every change.
        let mut updates = nodes
            .watch_with_history(">")
            .await
            .map_err(|e| DirectoryError::new("watching the nodes bucket", e))?;
        let watched = seen.clone();
        let store = nodes.clone();
        let watch = tokio::spawn(async move {
            let mut check = tokio::time::interval_at(tokio::time::Instant::now() + ttl, every);
            check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let renew = tokio::select! {
                    update = updates.next() => match update {
                        Some(Ok(entry)) => {
                            let mut seen = watched.lock().unwrap_or_else(PoisonError::into_inner);
                            match (entry.operation, NodeId::decode(&entry.value)) {
                                (Operation::Put, Some(node)) => {
                                    let nanos = u64::try_from(entry.created.unix_timestamp_nanos())
                                        .unwrap_or(0);
                                    let at = UNIX_EPOCH + Duration::from_nanos(nanos);
                                    seen.announced(&mine, node, at, ttl);
                                }
                                _ => {
                                    seen.nodes.remove(&entry.key);
                                }
                            }
                            false
                        }
                        Some(Err(_)) => false,
                        None => true,
                    },
                    _ = check.tick() => {
                        // This node's heartbeats are written but do not come back: the
                        // watch itself is stuck (its consumer went with a NATS server).
                        let seen = watched.lock().unwrap_or_else(PoisonError::into_inner);
                        let heard = seen.nodes.get(&mine.name).map(|(_, at)| *at);
                        let written_ms = written.load(Ordering::Relaxed);
                        now_ms().saturating_sub(written_ms) < 2 * every.as_millis() as u64
                            && heard.is_none_or(|at| !fresh(at, ttl))
                    }
                };
                if renew {
                    tracing::warn!("the nodes bucket's watch stopped; watching it again");
                    match store.watch_with_history(">").await {
                        Ok(again) => updates = again,
                        Err(e) => {
                            tracing::warn!(error = %e, "watching the nodes bucket failed; retrying");
                            tokio::time::sleep(every).await;
                        }
                    }
                }
            }
        });
        Ok(Self {
            me,
            nodes,
            ttl: spec.node_ttl,
            seen,
            heartbeat,
            watch,
        })
    }

    /// Whether `node` (this very incarnation) announced itself within the node TTL, as this
    /// node's watch of the bucket saw it. No I/O: asked on every claim and placement.
    ///
    /// Silence proves death only while this node hears its own heartbeats: when the nodes
    /// bucket cannot take writes (its stream is electing a leader after a NATS server died)
    /// or this node lost its connection, every announcement goes stale at once, its own
    /// included, and declaring every other node dead would move every object for nothing.
    /// So a node counts as alive while this node hears nothing, and once the bucket is heard
    /// again every node gets a whole TTL from that moment to announce itself.
    pub fn alive(&self, node: &NodeId) -> bool {
        if node == &self.me {
            return true;
        }
        let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        seen.nodes
            .get(&node.name)
            .is_some_and(|(known, at)| known == node && seen.counts_alive(&self.me, *at, self.ttl))
    }

    /// Counts `node` as dead until it announces itself again: a request to it found no one
    /// answering ([`crate::RpcError::NodeGone`]). Its objects can then be taken over at once
    /// rather than after its announcement expires; a node that is in fact alive reappears
    /// with its next heartbeat, and a take-over is fenced by the log either way.
    pub fn suspect(&self, node: &NodeId) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen
            .nodes
            .get(&node.name)
            .is_some_and(|(known, _)| known == node)
        {
            seen.nodes.remove(&node.name);
        }
    }

    /// Withdraws this node's announcement (an orderly stop), so the others take its
    /// objects over without waiting for it to expire.
    pub async fn leave(&self) {
        self.heartbeat.abort();
        if let Err(e) = self.nodes.delete(token(&self.me.name)).await {
            tracing::debug!(error = %e, "the node's announcement was not withdrawn");
        }
    }

    /// The nodes alive now by [`Membership::alive`]'s rule, by name; this node included.
    pub fn alive_nodes(&self) -> BTreeMap<String, NodeId> {
        let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let mut live: BTreeMap<String, NodeId> = seen
            .nodes
            .iter()
            .filter(|(_, (_, at))| seen.counts_alive(&self.me, *at, self.ttl))
            .map(|(name, (node, _))| (name.clone(), node.clone()))
            .collect();
        live.insert(self.me.name.clone(), self.me.clone());
        live
    }

    /// This node.
    pub fn me(&self) -> &NodeId {
        &self.me
    }

    /// Every node whose entry has not expired, by name.
    pub async fn live_nodes(&self) -> Result<BTreeMap<String, NodeId>, DirectoryError> {
        let keys: Vec<String> = self
            .nodes
            .keys()
            .await
            .map_err(|e| DirectoryError::new("listing nodes", e))?
            .try_collect()
            .await
            .map_err(|e| DirectoryError::new("listing nodes", e))?;
        let mut live = BTreeMap::new();
        for key in keys {
            let entry = self
                .nodes
                .entry(key.clone())
                .await
                .map_err(|e| DirectoryError::new(format!("reading node {key}"), e))?;
            if let Some(entry) = entry.filter(|e| e.operation == Operation::Put)
                && let Some(node) = NodeId::decode(&entry.value)
            {
                live.insert(node.name.clone(), node);
            }
        }
        Ok(live)
    }
}

/// The nodes bucket as this node's watch saw it.
#[derive(Debug, Default)]
struct Seen {
    /// Each node's latest announcement and when it was made (by the server's clock).
    nodes: BTreeMap<String, (NodeId, SystemTime)>,
    /// When this node's own announcements came through again after a gap longer than two
    /// heartbeats: the bucket was unwritable (a NATS election) or this node was cut off, so
    /// the others' silence before that moment proves nothing.
    heard_again: Option<SystemTime>,
}

impl Seen {
    /// Records an announcement watched at `at`; `me` is this node, whose gaps are tracked.
    fn announced(&mut self, me: &NodeId, node: NodeId, at: SystemTime, ttl: Duration) {
        if &node == me
            && let Some((_, before)) = self.nodes.get(&me.name).filter(|(n, _)| n == me)
            && at
                .duration_since(*before)
                .is_ok_and(|gap| gap > heartbeat_every(ttl) * 2)
        {
            self.heard_again = Some(at);
        }
        self.nodes.insert(node.name.clone(), (node, at));
    }

    /// Whether `at` (a node's latest announcement) is recent enough to count that node alive.
    ///
    /// Silence proves death only while this node hears its own heartbeats, and only for the
    /// time it has heard them: a node is dead once it stayed silent for a whole TTL while
    /// this node's announcements went through. While this node misses its own (none came
    /// back for two heartbeats), everyone counts as alive: the others' announcements stopped
    /// at the same moment, up to a heartbeat earlier, and would expire first.
    fn counts_alive(&self, me: &NodeId, at: SystemTime, ttl: Duration) -> bool {
        let hearing = self
            .nodes
            .get(&me.name)
            .is_some_and(|(known, mine)| known == me && fresh(*mine, heartbeat_every(ttl) * 2));
        let since = self.heard_again.map_or(at, |again| again.max(at));
        !hearing || fresh(since, ttl)
    }
}

/// How often a node announces itself: four times per TTL, so a slow write or two does not
/// make a live node expire.
fn heartbeat_every(ttl: Duration) -> Duration {
    ttl / 4
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.heartbeat.abort();
        self.watch.abort();
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Announced at `at` and not older than `ttl` now. A clock that went back counts as fresh.
fn fresh(at: SystemTime, ttl: Duration) -> bool {
    SystemTime::now()
        .duration_since(at)
        .map_or(true, |age| age < ttl)
}

/// The live node that should own `object`: rendezvous hashing, so every node computes the
/// same answer from the same list, owners spread evenly, and a node's loss moves only its
/// own objects.
pub fn place<'a>(object: &str, nodes: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    nodes
        .into_iter()
        .max_by_key(|node| fnv1a([node.as_bytes(), &[0xff], object.as_bytes()]))
}

/// FNV-1a (64 bits) with splitmix64's finalizer: a hash fixed by its definition, so every
/// node, whatever toolchain built it, places an object on the same node (std's
/// `DefaultHasher` may change between Rust releases, which a rolling upgrade would turn
/// into two placements). The finalizer spreads FNV's similar outputs for similar inputs,
/// which rendezvous hashing compares directly.
pub(crate) fn fnv1a<const N: usize>(parts: [&[u8]; N]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in parts.into_iter().flatten() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

/// Who owns each object now (a routing hint; see the module doc).
#[derive(Debug, Clone)]
pub struct Directory {
    owners: kv::Store,
}

/// The answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This node owns the object now; `revision` releases it.
    Mine { revision: u64 },
    /// A live node owns it: forward to it.
    Theirs(NodeId),
}

impl Directory {
    pub async fn open(nats: &Nats, spec: &DirectorySpec) -> Result<Self, DirectoryError> {
        Ok(Self {
            owners: bucket(
                nats,
                format!("{}_owners", spec.prefix),
                spec.replicas,
                Duration::ZERO,
            )
            .await?,
        })
    }

    /// The recorded owner of `object`, if any.
    pub async fn owner(&self, object: &str) -> Result<Option<(NodeId, u64)>, DirectoryError> {
        let entry = self
            .owners
            .entry(token(object))
            .await
            .map_err(|e| DirectoryError::new(format!("reading the owner of {object}"), e))?;
        Ok(entry
            .filter(|e| e.operation == Operation::Put)
            .and_then(|e| NodeId::decode(&e.value).map(|node| (node, e.revision))))
    }

    /// Makes `me` the owner of `object` unless a node `alive` says is alive owns it. Races
    /// between claimers are settled by the bucket's compare-and-set: one wins, the others
    /// see it as the owner. Reads may come from a replica that is a moment behind (the
    /// directory is a hint), so a claim that lost a race and cannot see the winner yet looks
    /// again, a bounded number of times.
    pub async fn claim(
        &self,
        object: &str,
        me: &NodeId,
        alive: impl Fn(&NodeId) -> bool,
    ) -> Result<Claim, DirectoryError> {
        let key = token(object);
        let mut last_error = None;
        for _ in 0..CLAIM_TRIES {
            match self.owners.create(&key, me.encode()).await {
                Ok(revision) => return Ok(Claim::Mine { revision }),
                Err(e) if e.kind() == CreateErrorKind::InvalidKey => {
                    return Err(DirectoryError::new(format!("claiming {object}"), e));
                }
                // It exists, or another claimer's create was in flight: see who owns it.
                Err(e) => last_error = Some(DirectoryError::new(format!("claiming {object}"), e)),
            }
            let Some((owner, revision)) = self.owner(object).await? else {
                // Released in between, or the winner's entry is not visible here yet.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            if &owner == me {
                // Its own entry, perhaps with a release of this revision still on its way
                // (the object hibernated a moment ago): a new revision makes that release
                // miss, so the entry cannot vanish under the activation starting now.
                match self.owners.update(&key, me.encode(), revision).await {
                    Ok(revision) => return Ok(Claim::Mine { revision }),
                    // Released or taken in between: look again.
                    Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => continue,
                    Err(e) => {
                        last_error = Some(DirectoryError::new(format!("claiming {object}"), e));
                        continue;
                    }
                }
            }
            if alive(&owner) {
                return Ok(Claim::Theirs(owner));
            }
            match self.owners.update(&key, me.encode(), revision).await {
                Ok(revision) => return Ok(Claim::Mine { revision }),
                // Another claimer moved first, or this read was behind: look again.
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {}
                Err(e) => {
                    last_error = Some(DirectoryError::new(format!("taking over {object}"), e))
                }
            }
        }
        Err(last_error.unwrap_or_else(|| {
            DirectoryError::new(
                format!("claiming {object}"),
                "its entry kept changing; another node keeps claiming it",
            )
        }))
    }

    /// Gives `object` up (as on hibernation), unless someone took it over since `revision`.
    pub async fn release(&self, object: &str, revision: u64) -> Result<(), DirectoryError> {
        self.owners
            .delete_expect_revision(token(object), Some(revision))
            .await
            .map_err(|e| DirectoryError::new(format!("releasing {object}"), e))
    }
}

/// Puts `me`'s fence at the end of `subject`: a marker appended with the log's current end as
/// its expectation. Returns the marker's sequence, which `me`'s next append expects; any
/// writer that appended before holds a stale expectation from now on.
pub async fn take_over(log: &FencedLog, subject: &str, me: &NodeId) -> Result<u64, TakeOverError> {
    let marker = Bytes::from(format!("owner {me}"));
    for _ in 0..TAKE_OVER_TRIES {
        let end = log
            .last_sequence(subject)
            .await
            .map_err(TakeOverError::Read)?;
        // The servers dedupe ids per stream, which many subjects share: the subject is
        // part of the id, or two objects' first markers would pass for one append.
        let id = format!(
            "owner-{subject}-{}-{:x}-{end}",
            token(&me.name),
            me.incarnation
        );
        match log.append(subject, marker.clone(), end, &id).await {
            Ok(appended) => return Ok(appended.sequence),
            // The former owner's last appends were still landing: read the end again.
            Err(AppendError::Fenced { .. } | AppendError::Contended) => {}
            Err(AppendError::Unacknowledged(_)) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(TakeOverError::Append(e)),
        }
    }
    Err(TakeOverError::Busy)
}

/// Looks a claim may take before it gives up on an entry that keeps changing.
const CLAIM_TRIES: usize = 100;

/// Reads and appends a take-over may make before it gives up on a log that keeps moving.
const TAKE_OVER_TRIES: usize = 100;

/// Why a take-over did not put its fence in.
#[derive(Debug, thiserror::Error)]
pub enum TakeOverError {
    #[error("reading the log's end: {0}")]
    Read(#[source] crate::fenced::LogError),
    #[error("appending the owner marker: {0}")]
    Append(#[source] AppendError),
    #[error("the log kept moving: another writer is still appending")]
    Busy,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_keep_only_safe_characters_and_tell_names_apart() {
        assert_eq!(token("news"), "news");
        assert_eq!(token("run:abc"), "run=3Aabc");
        assert_eq!(token("a.b"), "a=2Eb");
        assert_eq!(
            token("a=2Eb"),
            "a=3D2Eb",
            "an escape in a name is escaped too"
        );
        assert_ne!(token("a.b"), token("a=2Eb"));
        for name in ["user@example.com", "x-y_z.9", "é"] {
            assert!(
                token(name)
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-=".contains(&b)),
                "{name}"
            );
        }
    }

    #[test]
    fn silence_counts_only_for_a_ttl_of_time_this_node_was_heard() {
        let ttl = Duration::from_secs(5);
        let (me, other) = (NodeId::start("a"), NodeId::start("b"));
        let now = SystemTime::now();
        let ago = |secs: f64| now - Duration::from_secs_f64(secs);
        let mut seen = Seen::default();
        seen.announced(&me, other.clone(), ago(6.0), ttl);
        seen.announced(&me, me.clone(), ago(7.0), ttl);
        assert!(
            seen.counts_alive(&me, ago(6.0), ttl),
            "this node hears nothing either: nobody is judged"
        );
        // Heard again after a gap of 6 s: the other node gets a TTL from that moment.
        seen.announced(&me, me.clone(), ago(1.0), ttl);
        assert!(seen.counts_alive(&me, ago(6.0), ttl));
        // Heartbeats one beat apart are no gap: the grace does not move.
        seen.announced(&me, me.clone(), ago(1.0) + heartbeat_every(ttl), ttl);
        assert!(seen.counts_alive(&me, ago(6.0), ttl));
        assert_eq!(seen.heard_again, Some(ago(1.0)));
        // Five seconds of hearing without a word from it: dead.
        seen.heard_again = Some(ago(5.5));
        assert!(!seen.counts_alive(&me, ago(6.0), ttl));
        assert!(seen.counts_alive(&me, ago(0.5), ttl), "a fresh one lives");
        // Its own announcement missed two beats: the bucket stalled under everyone at once.
        seen.nodes.insert(me.name.clone(), (me.clone(), ago(3.0)));
        assert!(seen.counts_alive(&me, ago(6.0), ttl));
    }

    #[test]
    fn placement_spreads_owners_and_a_lost_node_moves_only_its_own() {
        let three = ["n1", "n2", "n3"];
        let objects: Vec<String> = (0..3000).map(|i| format!("chan-{i}")).collect();
        let mut counts = BTreeMap::new();
        for object in &objects {
            *counts.entry(place(object, three).unwrap()).or_insert(0) += 1;
        }
        for (node, count) in &counts {
            assert!((800..1200).contains(count), "{node} places {count} of 3000");
        }
        let two = ["n1", "n3"];
        for object in &objects {
            let before = place(object, three).unwrap();
            let after = place(object, two).unwrap();
            if before != "n2" {
                assert_eq!(before, after, "{object} moved though its node stayed");
            }
        }
        assert_eq!(place("x", []), None);
    }

    #[test]
    fn node_ids_round_trip_and_restarts_differ() {
        let a = NodeId::start("node a");
        assert_eq!(NodeId::decode(&a.encode()), Some(a.clone()));
        assert_ne!(NodeId::start("node a"), a);
        assert_eq!(NodeId::decode(b"not a node"), None);
    }
}
