//! Byte-level BPE trained with Hugging Face `tokenizers`: the GPT-4-style split pattern, every
//! byte in the base alphabet (so any text round-trips), and the four reserved special tokens
//! appended after the learned vocabulary, BOS first, as the original.

use std::path::Path;

use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper,
    PreTokenizerWrapper, SplitDelimiterBehavior, TokenizerBuilder,
};

use crate::{BOS_TOKEN, Error, Result, SPECIAL_TOKENS, SPLIT_PATTERN};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_id: u32,
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Trains on `texts` to at most `vocab_size` ids, the special tokens included. A corpus too
    /// small to learn that many merges yields a smaller vocabulary.
    pub fn train<I>(texts: I, vocab_size: usize) -> Result<Self>
    where
        I: Iterator<Item = String> + Send,
    {
        let learned = vocab_size
            .checked_sub(SPECIAL_TOKENS.len())
            .filter(|&n| n >= 256)
            .ok_or_else(|| Error::Invalid(format!("vocabulary {vocab_size} is below 260")))?;
        let split = Split::new(
            SplitPattern::Regex(SPLIT_PATTERN.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(tok_err)?;
        let pre_tokenizer = Sequence::new(vec![
            split.into(),
            ByteLevel::new(false, false, false).into(),
        ]);
        let mut tokenizer = TokenizerBuilder::<
            ModelWrapper,
            NormalizerWrapper,
            PreTokenizerWrapper,
            PostProcessorWrapper,
            DecoderWrapper,
        >::new()
        .with_model(BPE::default().into())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(pre_tokenizer.into()))
        .with_post_processor(None)
        .with_decoder(Some(ByteLevel::default().into()))
        .build()
        .map_err(tok_err)?;
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .vocab_size(learned)
            .min_frequency(0)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .show_progress(false)
            .build()
            .into();
        tokenizer.train(&mut trainer, texts).map_err(tok_err)?;
        let mut inner: tokenizers::Tokenizer = tokenizer.into();
        let specials: Vec<AddedToken> = SPECIAL_TOKENS
            .iter()
            .map(|s| AddedToken::from(*s, true))
            .collect();
        inner.add_special_tokens(specials).map_err(tok_err)?;
        Self::from_inner(inner)
    }

    fn from_inner(inner: tokenizers::Tokenizer) -> Result<Self> {
        let bos_id = inner
            .token_to_id(BOS_TOKEN)
            .ok_or_else(|| Error::Tokenizer(format!("no {BOS_TOKEN} token")))?;
        Ok(Tokenizer { inner, bos_id })
    }

    pub fn load(path: &Path) -> Result<Self> {
        Self::from_inner(
            tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Read {
                path: path.to_path_buf(),
                why: e.to_string(),
            })?,
        )
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let text = self.inner.to_string(false).map_err(tok_err)?;
        crate::write_atomic(path, text.as_bytes())
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn special_id(&self, name: &str) -> Option<u32> {
        SPECIAL_TOKENS
            .contains(&name)
            .then(|| self.inner.token_to_id(name))
            .flatten()
    }

    /// Ids in use, special tokens included.
    pub fn vocab_used(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode_fast(text, false)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    /// Encodes many documents in parallel.
    pub fn encode_batch(&self, texts: &[String]) -> Result<Vec<Vec<u32>>> {
        let inputs: Vec<&str> = texts.iter().map(String::as_str).collect();
        Ok(self
            .inner
            .encode_batch_fast(inputs, false)
            .map_err(tok_err)?
            .into_iter()
            .map(|e| e.get_ids().to_vec())
            .collect())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(tok_err)
    }

    /// Token id → UTF-8 byte length, `vocab_size` entries; 0 for special and unused ids.
    pub fn token_bytes(&self, vocab_size: usize) -> Vec<u32> {
        (0..vocab_size as u32)
            .map(|id| match self.inner.id_to_token(id) {
                Some(t) if !SPECIAL_TOKENS.contains(&t.as_str()) => {
                    // Byte-level tokens spell each byte as one character.
                    t.chars().count() as u32
                }
                _ => 0,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<String> {
        crate::builtin::documents(7, crate::Split::Train, 200_000)
    }

    #[test]
    fn round_trips_specials_and_byte_table() {
        let tok = Tokenizer::train(corpus().into_iter(), 1024).unwrap();
        assert!(tok.vocab_used() <= 1024);
        assert_eq!(tok.bos_id() as usize, tok.vocab_used() - 4);
        let table = tok.token_bytes(1024);
        let samples = [
            "Hello world! Numbers: 12345, 3.14159.",
            "日本語のテキストと中文文本，还有한국어.",
            "emoji 🦀🚀👩‍👩‍👧 and ZWJ sequences",
            "tabs\t\tand   many    spaces\n\n\n  trailing  \r\n",
            "",
            " ",
            "Ünïcödé — “quotes” ‘and’ dashes…",
        ];
        for text in samples {
            let ids = tok.encode(text).unwrap();
            assert_eq!(tok.decode(&ids).unwrap(), text, "round trip of {text:?}");
            let bytes: u32 = ids.iter().map(|&i| table[i as usize]).sum();
            assert_eq!(bytes as usize, text.len(), "byte table for {text:?}");
        }
        // Digits split into runs of at most two, so "12345" cannot be one token.
        let ids = tok.encode("12345").unwrap();
        assert!(ids.len() >= 3, "{ids:?}");
        for (i, name) in SPECIAL_TOKENS.iter().enumerate() {
            let id = tok.special_id(name).unwrap();
            assert_eq!(id, tok.bos_id() + i as u32);
            assert_eq!(tok.encode(name).unwrap(), vec![id]);
            assert_eq!(table[id as usize], 0);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        tok.save(&path).unwrap();
        let back = Tokenizer::load(&path).unwrap();
        let text = "Mira walked to the market in Velun.";
        assert_eq!(back.encode(text).unwrap(), tok.encode(text).unwrap());
        assert_eq!(
            back.encode_batch(&[text.to_string(), "x".into()]).unwrap()[0],
            tok.encode(text).unwrap()
        );
    }
}
