//! Nothing acknowledged under `always` is lost by `kill -9`: a child process (this test binary
//! again, running `crash_writer_child`) appends and prints each seq once its sync resolved;
//! the parent kills it with SIGKILL at some point and checks the data dir.
//!
//! The engine is the segment engine with tiny segments, and every batch also overwrites a
//! scratch record, so the kill lands among segment rotations and cleaner runs too.

mod support;

use std::io::{BufRead, BufReader, Read, Write as _};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dormouse_storage::{Durability, Storage};
use support::{apply, id, open_segments, payload};

/// Set (to the data dir) only in the child: without it, `crash_writer_child` does nothing.
const CHILD_ENV: &str = "DORMOUSE_STORAGE_CRASH_CHILD_DIR";
const CHILD_TEST: &str = "crash_writer_child";
/// Objects written concurrently, so acknowledgements come from shared fsyncs.
const OBJECTS: u64 = 4;
const PAYLOAD_LEN: usize = 1024;
/// Upper bounds that keep an orphaned child from running forever.
const CHILD_MAX_SEQ: u64 = 200_000;
const CHILD_MAX_RUN: Duration = Duration::from_secs(120);
const ACK_TIMEOUT: Duration = Duration::from_secs(60);

/// The writer. A normal test run passes through it in no time.
#[test]
fn crash_writer_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let store = Arc::new(open_segments(Path::new(&dir), Durability::Always));
        let started = Instant::now();
        let writers: Vec<_> = (0..OBJECTS)
            .map(|n| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    let chan = id("channel", &format!("c{n}"));
                    for seq in 1..=CHILD_MAX_SEQ {
                        if started.elapsed() > CHILD_MAX_RUN {
                            break;
                        }
                        apply(&*store, &chan, |b| {
                            b.append(seq, seq, payload(n, seq, PAYLOAD_LEN))
                                .put("last", seq.to_be_bytes().to_vec())
                                .put("scratch", payload(n + 100, seq, 2 * PAYLOAD_LEN));
                        })
                        .unwrap();
                        store.sync().await.unwrap();
                        let mut out = std::io::stdout().lock();
                        if writeln!(out, "ACK {n} {seq}")
                            .and_then(|()| out.flush())
                            .is_err()
                        {
                            // The parent is gone.
                            std::process::exit(1);
                        }
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }
    });
}

/// Kills the child if the test panics before it does.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `(object, seq)` from an ack line; libtest may print its own text on the same line.
fn parse_ack(line: &str) -> Option<(usize, u64)> {
    let rest = &line[line.find("ACK ")? + 4..];
    let mut parts = rest.split_whitespace();
    let object = parts.next()?.parse().ok()?;
    let seq = parts.next()?.parse().ok()?;
    Some((object, seq))
}

fn crash_round(kill_after_acks: usize) {
    let dir = tempfile::tempdir().unwrap();
    let mut child = KillOnDrop(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                CHILD_TEST,
                "--nocapture",
                "--include-ignored",
                "--test-threads",
                "1",
            ])
            .env(CHILD_ENV, dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let mut stderr = child.0.stderr.take().unwrap();
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let stderr_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });

    let mut acked = [0u64; OBJECTS as usize];
    let mut record = |line: &str| {
        if let Some((object, seq)) = parse_ack(line) {
            // Each object's writer acknowledges its seqs in order.
            assert_eq!(seq, acked[object] + 1, "ack out of order: {line}");
            acked[object] = seq;
        }
    };
    let deadline = Instant::now() + ACK_TIMEOUT;
    let mut acks = 0;
    while acks < kill_after_acks {
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                if parse_ack(&line).is_some() {
                    acks += 1;
                }
                record(&line);
            }
            Err(e) => {
                let _ = child.0.kill();
                let status = child.0.wait();
                panic!(
                    "child stopped acknowledging after {acks} acks ({e:?}, {status:?}); stderr:\n{}",
                    stderr_reader.join().unwrap_or_default()
                );
            }
        }
    }

    // SIGKILL on Unix: no destructor, no final flush.
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    // Acks printed before the kill but not yet read count too.
    while let Ok(line) = lines.recv_timeout(ACK_TIMEOUT) {
        record(&line);
    }
    let total: u64 = acked.iter().sum();
    eprintln!("killed after {total} acks: {acked:?}");

    let store = open_segments(dir.path(), Durability::Always);
    for (object, &last_acked) in acked.iter().enumerate() {
        let n = object as u64;
        let chan = id("channel", &format!("c{n}"));
        let entries = store.read_log(&chan, 0, usize::MAX).unwrap();
        let stored = entries.len() as u64;
        assert!(
            stored >= last_acked,
            "{chan}: {stored} entries survived, {last_acked} were acknowledged"
        );
        for (i, entry) in entries.iter().enumerate() {
            // In order, no holes: entry i is seq i + 1.
            assert_eq!(
                entry.seq,
                i as u64 + 1,
                "{chan}: hole before seq {}",
                entry.seq
            );
            assert_eq!(entry.timestamp_ms, entry.seq);
            assert!(
                entry.data == payload(n, entry.seq, PAYLOAD_LEN),
                "{chan}: payload of seq {} is corrupt",
                entry.seq
            );
        }
        if stored == 0 {
            assert_eq!(store.log_meta(&chan).unwrap(), None);
            continue;
        }
        // The meta and the key/value record were written in the same batches as the entries.
        let meta = store.log_meta(&chan).unwrap().unwrap();
        assert_eq!(
            (meta.first_seq, meta.last_seq, meta.count, meta.bytes),
            (1, stored, stored, stored * PAYLOAD_LEN as u64),
            "{chan}"
        );
        let last = store.get(&chan, b"last").unwrap().unwrap();
        assert_eq!(last.as_ref(), stored.to_be_bytes(), "{chan}");
        let scratch = store.get(&chan, b"scratch").unwrap().unwrap();
        assert!(
            scratch == payload(n + 100, stored, 2 * PAYLOAD_LEN),
            "{chan}: the scratch record is not the one of the last batch"
        );
    }
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    // Vary the kill points from run to run, within bounds that keep the test quick.
    let jitter = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as usize % 100)
        .unwrap_or(0);
    for kill_after_acks in [1 + jitter % 20, 300 + jitter, 1000 + 3 * jitter] {
        crash_round(kill_after_acks);
    }
}

#[test]
fn parses_acks_after_libtest_text() {
    assert_eq!(parse_ack("ACK 2 17"), Some((2, 17)));
    assert_eq!(
        parse_ack("test crash_writer_child ... ACK 0 1"),
        Some((0, 1))
    );
    assert_eq!(parse_ack("running 1 test"), None);
}
