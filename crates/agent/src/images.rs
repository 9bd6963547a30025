//! Images shipped with jobs: the client uploaded each container image to the server as a
//! zstd-compressed `docker save` archive; an agent that lacks the image fetches that archive
//! from the server and loads it into its Docker engine before the task starts. Nothing is ever
//! pulled from a registry.

use std::collections::HashMap;
use std::sync::Arc;

use drover_proto as pb;
use tokio::sync::Mutex;
use tokio_stream::StreamExt;

use crate::runtime::docker::DockerRuntime;

/// Fetches and loads images, once per image even when several tasks want it at the same time.
pub struct ImageFetcher {
    docker: Arc<DockerRuntime>,
    link: Arc<crate::link::Link>,
    /// One lock per image, so concurrent tasks wait for one load instead of loading it twice.
    loading: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

impl ImageFetcher {
    /// A fetcher that loads into `docker`, downloading from the first server that answers.
    pub fn new(docker: Arc<DockerRuntime>, link: Arc<crate::link::Link>) -> ImageFetcher {
        ImageFetcher { docker, link, loading: Mutex::new(HashMap::new()) }
    }

    /// The Docker runtime images are loaded into.
    pub fn docker(&self) -> &Arc<DockerRuntime> {
        &self.docker
    }

    /// Makes sure `image` (an image id) is present, loading it from the archive `blob` if not.
    pub async fn ensure(&self, image: &str, blob: &str) -> Result<(), String> {
        if self.docker.has_image(image).await {
            return Ok(());
        }
        let lock = self.loading.lock().await.entry(image.to_string()).or_default().clone();
        let _guard = lock.lock().await;
        if self.docker.has_image(image).await {
            return Ok(());
        }
        tracing::info!(image, blob, "fetching image archive from the server");
        match self.fetch(blob).await {
            Ok(()) if self.docker.has_image(image).await => {
                if let Err(e) = self.docker.name_loaded(image).await {
                    tracing::warn!(image, error = %e, "cannot name the loaded image");
                }
                tracing::info!(image, "image loaded");
                Ok(())
            }
            Ok(()) => Err(format!("archive {blob} did not contain image {image}")),
            Err(e) => Err(format!("cannot fetch image {image} from the server: {e}")),
        }
    }

    async fn fetch(&self, blob: &str) -> Result<(), String> {
        let mut client = self.link.client().await.map_err(|e| e.to_string())?;
        let stream = client
            .get_blob(pb::BlobRef { digest: blob.to_string(), ..Default::default() })
            .await
            .map_err(|e| e.message().to_string())?
            .into_inner()
            .map(|chunk| chunk.map(|c| bytes::Bytes::from(c.data)).map_err(std::io::Error::other));
        let compressed = tokio_util::io::StreamReader::new(stream);
        let tar = async_compression::tokio::bufread::ZstdDecoder::new(compressed);
        self.docker.load_image(tar).await.map_err(|e| e.to_string())
    }
}
