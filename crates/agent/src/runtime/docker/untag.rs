//! Image archives without their tags. A `docker save` archive names the tags `docker load`
//! applies (`RepoTags` in `manifest.json`, the legacy `repositories` file, and in OCI layouts
//! the name annotations of `index.json`). An archive shipped with one job could carry any name,
//! such as `postgres:15`, and loading it would move that name for every other job on the node.
//! So archives are copied without those names before they are loaded: the image arrives by its
//! id only, and the agent then gives it a name made from that id.

use std::io::{self, Read, Write};

/// Annotations through which an OCI layout names its images.
const NAME_ANNOTATIONS: [&str; 2] = ["io.containerd.image.name", "org.opencontainers.image.ref.name"];
/// Largest metadata file rewritten (manifests are a few KiB).
const MAX_METADATA: u64 = 16 << 20;

/// Copies the archive on `input` to `output` with every tag removed.
pub fn strip_tags<R: Read, W: Write>(input: R, output: W) -> io::Result<()> {
    let mut archive = tar::Archive::new(input);
    let mut builder = tar::Builder::new(output);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let name = path.to_string_lossy().trim_start_matches("./").to_owned();
        let mut header = entry.header().clone();
        match name.as_str() {
            "repositories" => continue,
            "manifest.json" | "index.json" => {
                if entry.size() > MAX_METADATA {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{name} is too large")));
                }
                let mut text = Vec::new();
                entry.read_to_end(&mut text)?;
                let rewritten =
                    if name == "manifest.json" { untag_manifest(&text)? } else { untag_index(&text)? };
                header.set_size(rewritten.len() as u64);
                header.set_cksum();
                builder.append(&header, rewritten.as_slice())?;
            }
            _ => builder.append(&header, &mut entry)?,
        }
    }
    builder.into_inner()?.flush()
}

fn json(text: &[u8]) -> io::Result<serde_json::Value> {
    serde_json::from_slice(text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn bytes(value: &serde_json::Value) -> io::Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// `manifest.json`: a list of images, each with `RepoTags`.
fn untag_manifest(text: &[u8]) -> io::Result<Vec<u8>> {
    let mut manifest = json(text)?;
    for image in manifest.as_array_mut().into_iter().flatten() {
        if let Some(image) = image.as_object_mut() {
            image.insert("RepoTags".into(), serde_json::Value::Null);
        }
    }
    bytes(&manifest)
}

/// `index.json` of an OCI layout: manifests whose annotations may name them.
fn untag_index(text: &[u8]) -> io::Result<Vec<u8>> {
    let mut index = json(text)?;
    let manifests = index.get_mut("manifests").and_then(|m| m.as_array_mut());
    for manifest in manifests.into_iter().flatten() {
        if let Some(annotations) = manifest.get_mut("annotations").and_then(|a| a.as_object_mut()) {
            for key in NAME_ANNOTATIONS {
                annotations.remove(key);
            }
        }
    }
    bytes(&index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, name, *data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    #[test]
    fn tags_are_removed_and_everything_else_is_kept() {
        let manifest =
            br#"[{"Config":"blobs/sha256/abc","RepoTags":["postgres:15","evil:latest"],"Layers":["l"]}]"#;
        let index = br#"{"manifests":[{"digest":"sha256:def","annotations":{"io.containerd.image.name":"docker.io/library/postgres:15","org.opencontainers.image.ref.name":"15","keep":"me"}}]}"#;
        let input = archive(&[
            ("manifest.json", manifest),
            ("index.json", index),
            ("repositories", br#"{"postgres":{"15":"abc"}}"#),
            ("blobs/sha256/abc", b"config"),
        ]);
        let mut out = Vec::new();
        strip_tags(input.as_slice(), &mut out).unwrap();
        let mut files = std::collections::BTreeMap::new();
        for entry in tar::Archive::new(out.as_slice()).entries().unwrap() {
            let mut entry = entry.unwrap();
            let mut data = String::new();
            entry.read_to_string(&mut data).unwrap();
            files.insert(entry.path().unwrap().display().to_string(), data);
        }
        assert!(!files.contains_key("repositories"));
        assert_eq!(files["blobs/sha256/abc"], "config");
        let manifest: serde_json::Value = serde_json::from_str(&files["manifest.json"]).unwrap();
        assert!(manifest[0]["RepoTags"].is_null() && manifest[0]["Layers"][0] == "l", "{manifest}");
        let index: serde_json::Value = serde_json::from_str(&files["index.json"]).unwrap();
        let annotations = &index["manifests"][0]["annotations"];
        assert!(
            annotations.get("io.containerd.image.name").is_none() && annotations["keep"] == "me",
            "{index}"
        );
        assert!(strip_tags(archive(&[("manifest.json", b"not json")]).as_slice(), &mut Vec::new()).is_err());
    }
}
