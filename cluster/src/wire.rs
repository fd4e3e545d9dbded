//! The bytes of what nodes send each other (journal records, forwarded requests): big-endian
//! integers and length-prefixed byte strings, read back by a [`Reader`] that fails, rather
//! than panics, on a damaged or foreign message.

use bytes::{BufMut, BytesMut};

/// A message that does not decode: damaged, or written by something else.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("undecodable message: {0}")]
pub struct Undecodable(pub String);

/// `n` as a u32 length. Lengths here are bounded far below 4 GiB (request bodies and
/// records are limited by configuration), so a larger one is a bug.
pub fn len32(n: usize) -> u32 {
    u32::try_from(n).expect("message parts fit in u32 lengths")
}

/// A byte string: its u32 length, then the bytes.
pub fn put_bytes(out: &mut BytesMut, bytes: &[u8]) {
    out.put_u32(len32(bytes.len()));
    out.put_slice(bytes);
}

/// A text string, as [`put_bytes`].
pub fn put_str(out: &mut BytesMut, text: &str) {
    put_bytes(out, text.as_bytes());
}

/// An optional u64: a flag byte, then the value when present.
pub fn put_opt(out: &mut BytesMut, value: Option<u64>) {
    match value {
        Some(v) => {
            out.put_u8(1);
            out.put_u64(v);
        }
        None => out.put_u8(0),
    }
}

/// A cursor over a message's bytes that fails, rather than panics, on a short message.
#[derive(Debug)]
pub struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Undecodable> {
        let end = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len());
        let Some(end) = end else {
            return Err(Undecodable(format!(
                "cut short: {n} bytes wanted at offset {} of {}",
                self.at,
                self.bytes.len()
            )));
        };
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    pub fn magic(&mut self, magic: &[u8; 4]) -> Result<(), Undecodable> {
        let found = self.take(4)?;
        if found != magic {
            return Err(Undecodable(format!(
                "expected a {} record",
                String::from_utf8_lossy(magic)
            )));
        }
        Ok(())
    }

    pub fn u8(&mut self) -> Result<u8, Undecodable> {
        Ok(self.take(1)?[0])
    }

    pub fn u16(&mut self) -> Result<u16, Undecodable> {
        let mut b = [0; 2];
        b.copy_from_slice(self.take(2)?);
        Ok(u16::from_be_bytes(b))
    }

    pub fn u32(&mut self) -> Result<u32, Undecodable> {
        let mut b = [0; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(b))
    }

    pub fn u64(&mut self) -> Result<u64, Undecodable> {
        let mut b = [0; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(b))
    }

    pub fn opt(&mut self) -> Result<Option<u64>, Undecodable> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.u64()?)),
            other => Err(Undecodable(format!("option flag {other}"))),
        }
    }

    /// A length-prefixed byte string: where it starts and how long it is.
    pub fn span(&mut self) -> Result<(usize, usize), Undecodable> {
        let len = self.u32()? as usize;
        let start = self.at;
        self.take(len)?;
        Ok((start, len))
    }

    pub fn bytes(&mut self) -> Result<&'a [u8], Undecodable> {
        let (start, len) = self.span()?;
        Ok(&self.bytes[start..start + len])
    }

    pub fn end(&self) -> Result<(), Undecodable> {
        if self.at != self.bytes.len() {
            return Err(Undecodable(format!(
                "{} bytes left over after the record",
                self.bytes.len() - self.at
            )));
        }
        Ok(())
    }
}

impl Reader<'_> {
    /// A text string written by [`put_str`].
    pub fn str(&mut self) -> Result<String, Undecodable> {
        let bytes = self.bytes()?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| Undecodable("a string that is not UTF-8".into()))
    }

    /// An optional text string: a flag byte, then the string when present.
    pub fn opt_str(&mut self) -> Result<Option<String>, Undecodable> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.str()?)),
            other => Err(Undecodable(format!("option flag {other}"))),
        }
    }
}

/// An optional text string, read by [`Reader::opt_str`].
pub fn put_opt_str(out: &mut BytesMut, value: Option<&str>) {
    match value {
        Some(text) => {
            out.put_u8(1);
            put_str(out, text);
        }
        None => out.put_u8(0),
    }
}
