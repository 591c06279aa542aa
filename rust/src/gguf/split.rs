//! A model that may be split over several GGUF files (`name-00001-of-00003.gguf`, `split.*` keys),
//! opened as one: metadata from the first part, tensors from all parts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::reader::{GgufFile, TensorInfo};
use super::value::Value;
use super::{KEY_SPLIT_COUNT, KEY_SPLIT_NO, KEY_SPLIT_TENSORS_COUNT};
use crate::error::{Error, Result};

/// Parses `prefix-00002-of-00005.gguf` into (prefix, 2, 5).
fn parse_split_name(path: &Path) -> Option<(String, usize, usize)> {
    let s = path.to_str()?;
    let stem = s.strip_suffix(".gguf")?;
    let (rest, count) = stem.rsplit_once("-of-")?;
    let (prefix, no) = rest.rsplit_once('-')?;
    if no.len() != 5 || count.len() != 5 {
        return None;
    }
    Some((prefix.to_string(), no.parse().ok()?, count.parse().ok()?))
}

/// All part paths of the split model `path` belongs to (just `[path]` if it is not split).
pub fn split_paths(path: &Path, count: usize) -> Vec<PathBuf> {
    match parse_split_name(path) {
        Some((prefix, _, _)) if count > 1 => (1..=count)
            .map(|i| PathBuf::from(format!("{prefix}-{i:05}-of-{count:05}.gguf")))
            .collect(),
        _ => vec![path.to_path_buf()],
    }
}

/// One logical model over one or more files.
pub struct GgufModel {
    pub files: Vec<GgufFile>,
    /// (file index, tensor) in file order.
    pub tensors: Vec<(usize, TensorInfo)>,
    index: HashMap<String, usize>,
}

fn split_err(path: &Path, field: &str, msg: String) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        offset: 0,
        field: field.into(),
        msg,
    }
}

impl GgufModel {
    /// Opens `path`; if it is a part of a split model (any part may be given), opens every part.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufModel> {
        let path = path.as_ref();
        let first = GgufFile::open(path)?;
        let count = first
            .header
            .get(KEY_SPLIT_COUNT)
            .and_then(Value::as_u64)
            .unwrap_or(1) as usize;
        let files = if count <= 1 {
            vec![first]
        } else {
            let paths = split_paths(path, count);
            if paths.len() != count {
                return Err(split_err(
                    path,
                    KEY_SPLIT_COUNT,
                    format!("says {count} parts but the file name is not of the form NAME-00001-of-{count:05}.gguf"),
                ));
            }
            let mut files = Vec::with_capacity(count);
            let mut first = Some(first);
            for p in paths {
                let f = match &first {
                    Some(f0) if f0.path == p => first.take().unwrap(),
                    _ => GgufFile::open(&p)?,
                };
                files.push(f);
            }
            files
        };
        let mut tensors = vec![];
        let mut index = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            if count > 1 {
                let no = f.header.get(KEY_SPLIT_NO).and_then(Value::as_u64);
                if no != Some(i as u64) {
                    return Err(split_err(
                        &f.path,
                        KEY_SPLIT_NO,
                        format!("is {no:?}, expected {i}"),
                    ));
                }
            }
            for t in f.tensors() {
                if index.insert(t.name.clone(), tensors.len()).is_some() {
                    return Err(split_err(
                        &f.path,
                        &format!("tensor '{}'", t.name),
                        "appears in more than one split".into(),
                    ));
                }
                tensors.push((i, t.clone()));
            }
        }
        if count > 1 {
            if let Some(n) = files[0]
                .header
                .get(KEY_SPLIT_TENSORS_COUNT)
                .and_then(Value::as_u64)
            {
                if n as usize != tensors.len() {
                    return Err(split_err(
                        &files[0].path,
                        KEY_SPLIT_TENSORS_COUNT,
                        format!(
                            "says {n} tensors but the {count} parts hold {}",
                            tensors.len()
                        ),
                    ));
                }
            }
        }
        Ok(GgufModel {
            files,
            tensors,
            index,
        })
    }

    /// Metadata of the model (the first part's).
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.files[0].header.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.files[0].header.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i].1)
    }

    pub fn tensor_data(&self, name: &str) -> Option<&[u8]> {
        let &i = self.index.get(name)?;
        let (f, t) = &self.tensors[i];
        Some(self.files[*f].tensor_data(t))
    }

    pub fn is_split(&self) -> bool {
        self.files.len() > 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_names() {
        assert_eq!(
            parse_split_name(Path::new("/m/q-00002-of-00005.gguf")),
            Some(("/m/q".into(), 2, 5))
        );
        assert_eq!(parse_split_name(Path::new("q.gguf")), None);
        assert_eq!(
            split_paths(Path::new("a-00001-of-00002.gguf"), 2)[1],
            PathBuf::from("a-00002-of-00002.gguf")
        );
    }
}
