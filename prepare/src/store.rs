//! Token shards: the prepared, tokenized documents of one split, read whole into memory.
//!
//! Layout (little endian): magic `ARTOK001`, `n_docs: u64`, `n_tokens: u64`,
//! `offsets: [u64; n_docs + 1]`, `tokens: [u16; n_tokens]`. Documents carry no BOS; the loader
//! prepends it. Tokens are u16 because every preset's vocabulary fits.

use std::path::Path;

use crate::{Error, Result};

const MAGIC: &[u8; 8] = b"ARTOK001";
const HEADER: usize = 24;

#[derive(Debug)]
pub struct TokenShard {
    offsets: Vec<u64>,
    tokens: Vec<u16>,
}

impl TokenShard {
    pub fn from_docs<D: AsRef<[u32]>>(docs: &[D]) -> Result<Self> {
        let mut offsets = Vec::with_capacity(docs.len() + 1);
        let mut tokens = Vec::new();
        offsets.push(0);
        for doc in docs {
            for &t in doc.as_ref() {
                let t = u16::try_from(t).map_err(|_| {
                    Error::Invalid(format!("token id {t} does not fit a u16 shard"))
                })?;
                tokens.push(t);
            }
            offsets.push(tokens.len() as u64);
        }
        Ok(TokenShard { offsets, tokens })
    }

    pub fn num_docs(&self) -> usize {
        self.offsets.len() - 1
    }

    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    pub fn doc(&self, i: usize) -> &[u16] {
        &self.tokens[self.offsets[i] as usize..self.offsets[i + 1] as usize]
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + 8 * self.offsets.len() + 2 * self.tokens.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.num_docs() as u64).to_le_bytes());
        out.extend_from_slice(&(self.tokens.len() as u64).to_le_bytes());
        for o in &self.offsets {
            out.extend_from_slice(&o.to_le_bytes());
        }
        for t in &self.tokens {
            out.extend_from_slice(&t.to_le_bytes());
        }
        out
    }

    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let corrupt = |why: &str| Error::Corrupt {
            path: path.to_path_buf(),
            why: why.to_string(),
        };
        if bytes.len() < HEADER || &bytes[..8] != MAGIC {
            return Err(corrupt("not a token shard"));
        }
        let word = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap()) as usize;
        let (n_docs, n_tokens) = (word(8), word(16));
        let expected = n_docs
            .checked_add(1)
            .and_then(|n| n.checked_mul(8))
            .and_then(|n| n.checked_add(HEADER))
            .and_then(|n| n.checked_add(n_tokens.checked_mul(2)?));
        if expected != Some(bytes.len()) {
            return Err(corrupt("truncated"));
        }
        let tokens_at = HEADER + 8 * (n_docs + 1);
        let offsets: Vec<u64> = bytes[HEADER..tokens_at]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        if offsets[0] != 0
            || offsets[n_docs] as usize != n_tokens
            || offsets.windows(2).any(|w| w[0] > w[1])
        {
            return Err(corrupt("bad document offsets"));
        }
        let tokens = bytes[tokens_at..]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        Ok(TokenShard { offsets, tokens })
    }

    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes, path)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        crate::write_atomic(path, &self.to_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let docs = vec![vec![1u32, 2, 3], vec![], vec![65535, 7]];
        let shard = TokenShard::from_docs(&docs).unwrap();
        let bytes = shard.to_bytes();
        let back = TokenShard::from_bytes(&bytes, Path::new("x")).unwrap();
        assert_eq!(back.num_docs(), 3);
        assert_eq!(back.doc(0), &[1, 2, 3]);
        assert!(back.doc(1).is_empty());
        assert_eq!(back.doc(2), &[65535, 7]);
        let err = TokenShard::from_bytes(&bytes[..bytes.len() - 1], Path::new("x")).unwrap_err();
        assert!(
            err.to_string().contains("autoresearch prepare --force"),
            "{err}"
        );
        assert!(TokenShard::from_docs(&[vec![70000u32]]).is_err());
    }
}
