//! Where documents come from: `builtin` (generated), `climbmix` (the original's parquet shards,
//! downloaded) and `dir:PATH` (local `.txt`, `.jsonl` and `.parquet` files).

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use parquet::schema::types::Type;

use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Builtin,
    Climbmix,
    Dir(PathBuf),
}

impl std::str::FromStr for Source {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "builtin" => Ok(Source::Builtin),
            "climbmix" => Ok(Source::Climbmix),
            _ => match s.strip_prefix("dir:") {
                Some(path) if !path.is_empty() => Ok(Source::Dir(PathBuf::from(path))),
                _ => Err(Error::UnknownSource(s.to_string())),
            },
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Builtin => f.write_str("builtin"),
            Source::Climbmix => f.write_str("climbmix"),
            Source::Dir(path) => write!(f, "dir:{}", path.display()),
        }
    }
}

/// Which split a local file feeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Train,
    Val,
    /// No file is marked for validation: documents are held out by a hash of their text.
    Mixed,
}

#[derive(Clone, Debug)]
pub struct RawFile {
    pub path: PathBuf,
    pub role: Role,
}

const EXTENSIONS: &[&str] = &["txt", "jsonl", "parquet"];

/// Files of a `dir:` source, sorted. A file whose path below `dir` has a part starting with
/// `val` (`val/…`, `validation.jsonl`) is validation data; without any, documents are held out
/// by hash ([`held_out`]).
pub fn list_dir(dir: &Path) -> Result<Vec<RawFile>> {
    if !dir.is_dir() {
        return Err(Error::Invalid(format!(
            "{} is not a directory: give dir:PATH an existing directory of .txt, .jsonl or .parquet files",
            dir.display()
        )));
    }
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(|e| Error::io(&d, e))? {
            let path = entry.map_err(|e| Error::io(&d, e))?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| EXTENSIONS.contains(&e))
            {
                files.push(path);
            }
        }
    }
    files.sort();
    let is_val = |p: &Path| {
        p.strip_prefix(dir).unwrap_or(p).components().any(|c| {
            c.as_os_str()
                .to_string_lossy()
                .to_lowercase()
                .starts_with("val")
        })
    };
    let any_val = files.iter().any(|p| is_val(p));
    Ok(files
        .into_iter()
        .map(|path| {
            let role = match (any_val, is_val(&path)) {
                (false, _) => Role::Mixed,
                (true, true) => Role::Val,
                (true, false) => Role::Train,
            };
            RawFile { path, role }
        })
        .collect())
}

/// Whether a document of a `Mixed` file goes to validation: about one in twenty, decided by a
/// hash of its text so the split does not depend on file order.
pub fn held_out(text: &str) -> bool {
    // SHA-256: stable across platforms and releases (unlike the std hasher) and well mixed
    // (unlike FNV, whose low bits barely move when texts differ in a digit).
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(text.as_bytes());
    u64::from_le_bytes(h[..8].try_into().unwrap()) % 20 == 0
}

/// Calls `f` with every document of a `.txt` (the whole file), `.jsonl` (`text` of each line)
/// or `.parquet` (`text` column) file.
pub fn for_each_document(path: &Path, mut f: impl FnMut(String) -> Result<()>) -> Result<()> {
    let read_err = |why: String| Error::Read {
        path: path.to_path_buf(),
        why,
    };
    match path.extension().and_then(|e| e.to_str()) {
        Some("txt") => {
            let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            f(String::from_utf8_lossy(&bytes).into_owned())
        }
        Some("jsonl") => {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let value: serde_json::Value = serde_json::from_str(line)
                    .map_err(|e| read_err(format!("line {}: {e}", i + 1)))?;
                match value.get("text").and_then(|t| t.as_str()) {
                    Some(t) => f(t.to_string())?,
                    None => {
                        return Err(read_err(format!("line {}: no string field `text`", i + 1)));
                    }
                }
            }
            Ok(())
        }
        Some("parquet") => {
            let file = File::open(path).map_err(|e| Error::io(path, e))?;
            let reader = SerializedFileReader::new(file).map_err(|e| read_err(e.to_string()))?;
            let schema = reader.metadata().file_metadata().schema();
            let text = schema
                .get_fields()
                .iter()
                .find(|c| c.name() == "text")
                .ok_or_else(|| read_err("no `text` column".into()))?;
            let projection = Type::group_type_builder(schema.name())
                .with_fields(vec![Arc::clone(text)])
                .build()
                .map_err(|e| read_err(e.to_string()))?;
            for row in reader
                .get_row_iter(Some(projection))
                .map_err(|e| read_err(e.to_string()))?
            {
                let row = row.map_err(|e| read_err(e.to_string()))?;
                for (_, field) in row.get_column_iter() {
                    if let Field::Str(s) = field {
                        f(s.clone())?;
                    }
                }
            }
            Ok(())
        }
        _ => Err(read_err("not a .txt, .jsonl or .parquet file".into())),
    }
}

/// Writes `texts` as a parquet file with one `text` column (zstd), as the climbmix shards are.
/// For tests and mirrors.
pub fn write_text_parquet(path: &Path, texts: &[&str]) -> Result<()> {
    use parquet::basic::{Compression, ZstdLevel};
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;

    let err = |e: parquet::errors::ParquetError| Error::Read {
        path: path.to_path_buf(),
        why: e.to_string(),
    };
    let schema = Arc::new(
        parse_message_type("message schema { REQUIRED BYTE_ARRAY text (UTF8); }").map_err(err)?,
    );
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .build(),
    );
    let file = File::create(path).map_err(|e| Error::io(path, e))?;
    let mut writer = SerializedFileWriter::new(file, schema, props).map_err(err)?;
    let mut group = writer.next_row_group().map_err(err)?;
    if let Some(mut column) = group.next_column().map_err(err)? {
        let values: Vec<ByteArray> = texts.iter().map(|t| ByteArray::from(*t)).collect();
        column
            .typed::<ByteArrayType>()
            .write_batch(&values, None, None)
            .map_err(err)?;
        column.close().map_err(err)?;
    }
    group.close().map_err(err)?;
    writer.close().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        assert_eq!("builtin".parse::<Source>().unwrap(), Source::Builtin);
        assert_eq!(
            "dir:/x".parse::<Source>().unwrap(),
            Source::Dir("/x".into())
        );
        let err = "s3://bucket".parse::<Source>().unwrap_err().to_string();
        assert!(err.contains("builtin, climbmix or dir:PATH"), "{err}");
    }

    #[test]
    fn reads_all_three_formats() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("a.txt"), "plain text document").unwrap();
        std::fs::write(
            d.join("b.jsonl"),
            "{\"text\": \"first\"}\n\n{\"text\": \"second\", \"id\": 2}\n",
        )
        .unwrap();
        std::fs::create_dir(d.join("val")).unwrap();
        write_text_parquet(&d.join("val/c.parquet"), &["p1", "p2 ünï"]).unwrap();
        std::fs::write(d.join("ignored.md"), "not a source").unwrap();
        let files = list_dir(d).unwrap();
        let roles: Vec<_> = files.iter().map(|f| f.role).collect();
        assert_eq!(roles, [Role::Train, Role::Train, Role::Val]);
        let mut docs = Vec::new();
        for file in &files {
            for_each_document(&file.path, |t| {
                docs.push(t);
                Ok(())
            })
            .unwrap();
        }
        assert_eq!(
            docs,
            ["plain text document", "first", "second", "p1", "p2 ünï"]
        );
        std::fs::write(d.join("bad.jsonl"), "{\"body\": 1}\n").unwrap();
        let err = for_each_document(&d.join("bad.jsonl"), |_| Ok(())).unwrap_err();
        assert!(err.to_string().contains("no string field `text`"), "{err}");
    }
}
