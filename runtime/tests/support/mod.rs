//! Test objects and storage wrappers shared by the runtime's integration tests.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use dormouse_runtime::Context;
use dormouse_runtime::storage::{
    Bytes, LogEntry, LogMeta, MemoryStorage, ObjectId, Storage, SyncFuture, WriteBatch,
};
use dormouse_runtime::{Object, Outbound, Socket};
use tokio::sync::Semaphore;

/// Reads a big-endian u64 stored under `key`, 0 when absent.
pub fn read_u64(ctx: &Context<'_>, key: &[u8]) -> anyhow::Result<u64> {
    Ok(match ctx.get(key)? {
        Some(bytes) => u64::from_be_bytes(bytes.as_ref().try_into().context("u64 record")?),
        None => 0,
    })
}

/// What every `Probe` activation shares with the test.
#[derive(Debug, Default)]
pub struct ProbeEnv {
    /// Times `activate` ran, all names together.
    pub activations: AtomicUsize,
    /// How long `activate` dawdles, to widen activation races.
    pub activate_delay: Mutex<Option<Duration>>,
    /// Names currently inside a handler: two entries for one name = two live activations.
    pub busy: Mutex<HashSet<String>>,
    /// Every (sender, seq) handled, to prove exactly-once.
    pub handled: Mutex<HashSet<(u32, u64)>>,
    /// Count of violations seen by handlers (overlap, duplicate, reordering).
    pub violations: AtomicU64,
    /// Alarm handler runs, all names together.
    pub alarm_calls: AtomicUsize,
    /// How many alarm handler runs should fail before they succeed.
    pub failing_alarms: AtomicUsize,
}

/// Requests understood by [`Probe`].
#[derive(Debug)]
pub enum ProbeReq {
    /// Adds to the persistent counter and returns the new value.
    Add(u64),
    /// Returns the counter.
    Get,
    /// Writes a value then fails: the write must be discarded.
    WriteThenFail(u64),
    /// Panics.
    Panic,
    /// One message of the stress test.
    Seq { sender: u32, seq: u64 },
    /// Adds, and registers an after-commit effect that records into the given log.
    AddWithEffect(u64, Arc<Mutex<Vec<String>>>),
    /// Keeps a client connection; returns how many sockets the object now holds.
    Accept(Socket),
    /// Sends the text to every socket after the commit; returns how many it went to.
    Broadcast(String),
    /// Sets the alarm this far from now.
    SetAlarmIn(std::time::Duration),
    /// Deletes the alarm.
    DeleteAlarm,
    /// 1 when an alarm is set, else 0.
    HasAlarm,
    /// Asks to hibernate as soon as possible.
    HibernateNow,
    /// Asks to stay in memory this long.
    StayAwake(std::time::Duration),
}

/// A test object with a persistent counter and instrumentation.
#[derive(Debug)]
pub struct Probe {
    counter: u64,
    env: Arc<ProbeEnv>,
}

impl Object for Probe {
    type Env = Arc<ProbeEnv>;
    type Request = ProbeReq;
    type Response = u64;

    async fn activate(ctx: &mut Context<'_>, env: &Arc<ProbeEnv>) -> anyhow::Result<Self> {
        env.activations.fetch_add(1, Ordering::SeqCst);
        let delay = *env.activate_delay.lock().unwrap();
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        Ok(Probe {
            counter: read_u64(ctx, b"counter")?,
            env: env.clone(),
        })
    }

    async fn alarm(&mut self, ctx: &mut Context<'_>) -> anyhow::Result<()> {
        self.on_alarm(ctx).await
    }

    async fn handle(&mut self, ctx: &mut Context<'_>, req: ProbeReq) -> anyhow::Result<u64> {
        match req {
            ProbeReq::Add(n) => {
                self.counter += n;
                ctx.put(b"counter".to_vec(), self.counter.to_be_bytes().to_vec());
                Ok(self.counter)
            }
            ProbeReq::Get => Ok(self.counter),
            ProbeReq::WriteThenFail(n) => {
                self.counter += n;
                ctx.put(b"counter".to_vec(), self.counter.to_be_bytes().to_vec());
                anyhow::bail!("refusing after writing {n}")
            }
            ProbeReq::Panic => panic!("probe asked to panic"),
            ProbeReq::SetAlarmIn(after) => {
                ctx.set_alarm(std::time::SystemTime::now() + after);
                Ok(0)
            }
            ProbeReq::DeleteAlarm => {
                ctx.delete_alarm();
                Ok(0)
            }
            ProbeReq::HasAlarm => Ok(u64::from(ctx.alarm()?.is_some())),
            ProbeReq::HibernateNow => {
                ctx.hibernate();
                Ok(0)
            }
            ProbeReq::StayAwake(d) => {
                ctx.stay_awake_for(d);
                Ok(0)
            }
            ProbeReq::AddWithEffect(n, log) => {
                self.counter += n;
                ctx.put(b"counter".to_vec(), self.counter.to_be_bytes().to_vec());
                let value = self.counter;
                ctx.after_commit(move || log.lock().unwrap().push(format!("effect {value}")));
                Ok(self.counter)
            }
            ProbeReq::Accept(socket) => {
                ctx.accept_socket(socket);
                Ok(ctx.socket_count() as u64)
            }
            ProbeReq::Broadcast(text) => {
                let sockets = ctx.sockets();
                let count = sockets.len() as u64;
                let text = Bytes::from(text);
                ctx.after_commit(move || {
                    for socket in sockets.iter() {
                        socket.send(Outbound::Text(text.clone()));
                    }
                });
                Ok(count)
            }
            ProbeReq::Seq { sender, seq } => {
                let name = ctx.name().to_string();
                if !self.env.busy.lock().unwrap().insert(name.clone()) {
                    self.env.violations.fetch_add(1, Ordering::SeqCst);
                }
                // Give a second activation, if one existed, the chance to overlap.
                tokio::task::yield_now().await;
                let key = format!("last/{sender}").into_bytes();
                let last = read_u64(ctx, &key)?;
                if seq <= last {
                    self.env.violations.fetch_add(1, Ordering::SeqCst);
                }
                ctx.put(key, seq.to_be_bytes().to_vec());
                if !self.env.handled.lock().unwrap().insert((sender, seq)) {
                    self.env.violations.fetch_add(1, Ordering::SeqCst);
                }
                self.env.busy.lock().unwrap().remove(&name);
                Ok(seq)
            }
        }
    }
}

impl Probe {
    /// Counts alarm runs in storage (so a count survives restarts) and in the env.
    async fn on_alarm(&mut self, ctx: &mut Context<'_>) -> anyhow::Result<()> {
        self.env.alarm_calls.fetch_add(1, Ordering::SeqCst);
        let failing = self.env.failing_alarms.load(Ordering::SeqCst);
        if failing > 0 {
            self.env.failing_alarms.fetch_sub(1, Ordering::SeqCst);
            anyhow::bail!("alarm asked to fail");
        }
        let fired = read_u64(ctx, b"alarms")? + 1;
        ctx.put(b"alarms".to_vec(), fired.to_be_bytes().to_vec());
        Ok(())
    }
}

/// Storage whose commits complete only when the test says so, to observe the output gate.
#[derive(Debug)]
pub struct GatedStorage {
    inner: MemoryStorage,
    permits: Arc<Semaphore>,
    pub syncs_requested: AtomicUsize,
}

impl GatedStorage {
    pub fn new() -> Self {
        Self {
            inner: MemoryStorage::new(),
            permits: Arc::new(Semaphore::new(0)),
            syncs_requested: AtomicUsize::new(0),
        }
    }

    /// Lets `n` pending or future commits complete.
    pub fn release(&self, n: usize) {
        self.permits.add_permits(n);
    }
}

impl Storage for GatedStorage {
    fn apply(&self, id: &ObjectId, batch: WriteBatch) -> dormouse_runtime::storage::Result<()> {
        self.inner.apply(id, batch)
    }
    fn sync(&self) -> SyncFuture {
        self.syncs_requested.fetch_add(1, Ordering::SeqCst);
        let permits = self.permits.clone();
        Box::pin(async move {
            permits.acquire().await.expect("semaphore open").forget();
            Ok(())
        })
    }
    fn boot(&self) -> dormouse_runtime::storage::Boot {
        self.inner.boot()
    }
    fn allocate_epoch(&self) -> dormouse_runtime::storage::Result<u64> {
        self.inner.allocate_epoch()
    }
    fn durability(&self) -> dormouse_runtime::storage::Durability {
        self.inner.durability()
    }
    fn log_meta(&self, id: &ObjectId) -> dormouse_runtime::storage::Result<Option<LogMeta>> {
        self.inner.log_meta(id)
    }
    fn read_log(
        &self,
        id: &ObjectId,
        from_seq: u64,
        limit: usize,
    ) -> dormouse_runtime::storage::Result<Vec<LogEntry>> {
        self.inner.read_log(id, from_seq, limit)
    }
    fn read_log_tail(
        &self,
        id: &ObjectId,
        limit: usize,
    ) -> dormouse_runtime::storage::Result<Vec<LogEntry>> {
        self.inner.read_log_tail(id, limit)
    }
    fn read_log_before(
        &self,
        id: &ObjectId,
        before_seq: u64,
        limit: usize,
    ) -> dormouse_runtime::storage::Result<Vec<LogEntry>> {
        self.inner.read_log_before(id, before_seq, limit)
    }
    fn get(&self, id: &ObjectId, key: &[u8]) -> dormouse_runtime::storage::Result<Option<Bytes>> {
        self.inner.get(id, key)
    }
    fn list(
        &self,
        id: &ObjectId,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> dormouse_runtime::storage::Result<Vec<(Vec<u8>, Bytes)>> {
        self.inner.list(id, prefix, start_after, limit)
    }
    fn alarm(&self, id: &ObjectId) -> dormouse_runtime::storage::Result<Option<u64>> {
        self.inner.alarm(id)
    }
    fn due_alarms(
        &self,
        now_ms: u64,
        limit: usize,
    ) -> dormouse_runtime::storage::Result<Vec<(ObjectId, u64)>> {
        self.inner.due_alarms(now_ms, limit)
    }
    fn next_alarm(&self) -> dormouse_runtime::storage::Result<Option<(ObjectId, u64)>> {
        self.inner.next_alarm()
    }
    fn list_logs(
        &self,
        namespace: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> dormouse_runtime::storage::Result<Vec<String>> {
        self.inner.list_logs(namespace, start_after, limit)
    }
    fn size_on_disk(&self) -> dormouse_runtime::storage::Result<u64> {
        self.inner.size_on_disk()
    }
}

/// A `Probe` namespace over fresh in-memory storage with the given idle timeout.
pub fn probes(idle: std::time::Duration) -> (dormouse_runtime::Namespace<Probe>, Arc<ProbeEnv>) {
    let env = Arc::new(ProbeEnv::default());
    let runtime = dormouse_runtime::Runtime::new(Arc::new(MemoryStorage::new()));
    let ns = runtime.namespace(
        "probe",
        dormouse_runtime::NamespaceConfig::with_idle_timeout(idle),
        env.clone(),
    );
    (ns, env)
}

/// Opens (or reopens) a sled data dir with durability `always`.
pub fn open_sled(dir: &std::path::Path) -> Arc<dormouse_runtime::storage::SledStorage> {
    let mut config = dormouse_runtime::storage::SledConfig::new(dir);
    config.durability = dormouse_runtime::storage::Durability::Always;
    Arc::new(dormouse_runtime::storage::SledStorage::open(config).unwrap())
}
