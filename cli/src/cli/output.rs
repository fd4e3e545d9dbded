//! Standard output for results, which may be a pipe closed early (`dormouse tail x | head`).

use std::io::Write as _;

/// The reader of stdout went away: not a failure, just the end.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed")]
pub(crate) struct Closed;

/// Writes `bytes` to stdout and flushes, so each result is seen as soon as it exists (a
/// test or a pipeline reads them one by one).
pub(crate) fn write(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(Closed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("writing to standard output")),
    }
}

/// [`write()`] of one line.
pub(crate) fn line(text: &str) -> anyhow::Result<()> {
    let mut bytes = Vec::with_capacity(text.len() + 1);
    bytes.extend_from_slice(text.as_bytes());
    bytes.push(b'\n');
    write(&bytes)
}
