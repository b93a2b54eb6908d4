//! The image repository's routes, in the shape of Incus' `/1.0/images`.
//!
//! | route | |
//! | --- | --- |
//! | `GET /1.0/images`, `POST /1.0/images?name=NAME` | list; import (the body is an image archive) |
//! | `GET /1.0/images/{name}`, `DELETE /1.0/images/{name}` | one image (by name or alias); delete it |
//! | `GET /1.0/images/{name}/manifest` | the manifest's exact bytes (what a signature covers) |
//! | `PUT /1.0/images/{name}/signature` | store a signature (`manifest.sig` JSON) |
//! | `POST /1.0/images/{name}/verify` | re-hash every blob; marks the image ok or corrupted |
//! | `GET /1.0/images/{name}/export` | the image as an archive (streamed) |
//! | `POST /1.0/images/aliases`, `DELETE /1.0/images/aliases/{name}` | aliases |
//! | `POST /1.0/images/prune` | remove blobs no image or VM references, and leftover temp files |
//!
//! Imports and exports stream: the request body is fed to the (blocking) importer through a
//! small channel, and the exporter's output to the response the same way, so neither holds
//! an image in memory.

use crate::api::{App, Empty, ErrorReply, Reply, blocking, ok, parse, query};
use crate::authz::Authz;
use crate::daemon::OpError;
use crate::images::{ImportReport, PruneReport, VerifyReport};
use crate::store_images::ImageRecord;
use axum::Extension;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Deserialize;
use std::io::{self, Read, Write};
use tokio::sync::mpsc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

const NAME: &str = "The image's name or an alias";
/// Chunks in flight between the HTTP side and the blocking side.
const DEPTH: usize = 16;

pub(crate) fn routes() -> OpenApiRouter<App> {
    OpenApiRouter::new()
        .routes(routes!(image_list, image_import))
        .routes(routes!(image_info, image_delete))
        .routes(routes!(image_manifest))
        .routes(routes!(image_signature))
        .routes(routes!(image_verify))
        .routes(routes!(image_export))
        .routes(routes!(image_alias_set))
        .routes(routes!(image_alias_delete))
        .routes(routes!(image_prune))
        .routes(routes!(vm_publish))
}

/// The body of `POST /1.0/vms/{name}/publish`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct PublishRequest {
    /// The new image's name.
    image: String,
}

/// Publishes a stopped VM as a new image: its root volume (first disk) is copied, scrubbed
/// of machine-specific files (machine-id, ssh host keys, histories, logs) and stored with
/// its kernel and initrd. The reply lists what the scrub did, item by item.
#[utoipa::path(post, path = "/1.0/vms/{name}/publish", tag = "images",
    params(("name" = String, Path, description = "The VM's name")),
    request_body = PublishRequest,
    responses(
        (status = 201, description = "The new image and the scrub report",
            body = Reply<crate::publish::PublishReport>),
        (status = 400, description = "Bad name, no disk, or a root that is not ext4",
            body = ErrorReply),
        (status = 404, description = "No such VM", body = ErrorReply),
        (status = 409, description = "The VM runs, or the image name is taken",
            body = ErrorReply)))]
async fn vm_publish(
    State(d): State<App>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, OpError> {
    let req: PublishRequest = parse(&body)?;
    let report = blocking(move || d.publish(&name, &req.image)).await?;
    Ok(ok(StatusCode::CREATED, report))
}

/// Every image, ordered by name.
#[utoipa::path(get, path = "/1.0/images", tag = "images",
    responses(
        (status = 200, description = "The images", body = Reply<Vec<ImageRecord>>),
        (status = 500, description = "The store failed", body = ErrorReply)))]
async fn image_list(
    State(d): State<App>,
    Extension(a): Extension<Authz>,
) -> Result<Response, OpError> {
    let mut images = blocking(move || d.image_list()).await?;
    images.retain(|i| a.sees(&i.project, &i.label, i.public));
    Ok(ok(StatusCode::OK, images))
}

/// Imports an image archive (`manifest.json`, optional `manifest.sig`, `blobs/<sha256>`, as
/// plain ustar). The image appears only once every blob is stored and checked; a refused
/// archive leaves nothing behind.
#[utoipa::path(post, path = "/1.0/images", tag = "images",
    params(("name" = Option<String>, Query,
        description = "Store it under this name (default: the manifest's)"),
        ("public" = Option<bool>, Query,
        description = "Usable by every project (default false: only by its own)"),
        ("project" = Option<String>, Query,
        description = "The project that owns it (default: the user's only project)")),
    request_body(content = Vec<u8>, content_type = "application/x-tar",
        description = "The image archive"),
    responses(
        (status = 201, description = "Imported", body = Reply<ImportReport>),
        (status = 400, description = "A malformed archive or manifest, a digest mismatch, \
            an unsafe entry (the message says which)", body = ErrorReply),
        (status = 409, description = "An image or alias of that name exists", body = ErrorReply),
        (status = 500, description = "The blob store or the state database failed",
            body = ErrorReply)))]
async fn image_import(
    State(d): State<App>,
    Extension(a): Extension<Authz>,
    RawQuery(q): RawQuery,
    body: Body,
) -> Result<Response, OpError> {
    let q = query(q);
    let name = q.get("name").cloned();
    let public = matches!(q.get("public").map(String::as_str), Some("true" | "1" | ""));
    let project = a.target_project().map_err(OpError::BadRequest)?;
    let project2 = project.clone();
    let d2 = std::sync::Arc::clone(&d);
    let (tx, rx) = mpsc::channel::<Result<Bytes, String>>(DEPTH);
    let mut stream = body.into_data_stream();
    tokio::spawn(async move {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| e.to_string());
            let end = chunk.is_err();
            // The importer stops reading on a refusal: then stop receiving too.
            if tx.send(chunk).await.is_err() || end {
                break;
            }
        }
    });
    let report = blocking(move || {
        let mut r = ChannelReader {
            rx,
            buf: Bytes::new(),
        };
        d.image_import(&project2, name.as_deref(), &mut r)
    })
    .await?;
    let report = blocking(move || {
        let mut report = report;
        let lowest = d2.auth.levels.show(&d2.auth.levels.lowest());
        let mut store = d2.store();
        store.image_set_access(&report.image.key, &project, public, &lowest)?;
        report.image = store.image_get(&report.image.key)?;
        Ok(report)
    })
    .await?;
    Ok(ok(StatusCode::CREATED, report))
}

/// The request body as a blocking reader.
struct ChannelReader {
    rx: mpsc::Receiver<Result<Bytes, String>>,
    buf: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.buf.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Ok(b)) => self.buf = b,
                Some(Err(e)) => {
                    return Err(io::Error::other(format!("the upload failed: {e}")));
                }
            }
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf.split_to(n));
        Ok(n)
    }
}

/// A blocking writer whose chunks become the response body.
struct ChannelWriter {
    tx: mpsc::Sender<Result<Bytes, io::Error>>,
    buf: Vec<u8>,
}

const CHUNK: usize = 256 << 10;

impl Write for ChannelWriter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(b);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))
    }
}

/// One image, by name or alias.
#[utoipa::path(get, path = "/1.0/images/{name}", tag = "images",
    params(("name" = String, Path, description = NAME)),
    responses(
        (status = 200, description = "The image", body = Reply<ImageRecord>),
        (status = 404, description = "No such image", body = ErrorReply)))]
async fn image_info(State(d): State<App>, Path(name): Path<String>) -> Result<Response, OpError> {
    let image = blocking(move || d.image_get(&name)).await?;
    Ok(ok(StatusCode::OK, image))
}

/// Deletes an image and its aliases; its blobs go too unless another image or a VM uses
/// them.
#[utoipa::path(delete, path = "/1.0/images/{name}", tag = "images",
    params(("name" = String, Path, description = NAME)),
    responses(
        (status = 200, description = "Deleted", body = Reply<Empty>),
        (status = 404, description = "No such image", body = ErrorReply),
        (status = 500, description = "A blob could not be removed", body = ErrorReply)))]
async fn image_delete(State(d): State<App>, Path(name): Path<String>) -> Result<Response, OpError> {
    blocking(move || d.image_delete(&name)).await?;
    Ok(ok(StatusCode::OK, Empty {}))
}

/// The manifest's exact bytes: what `vme image sign` signs.
#[utoipa::path(get, path = "/1.0/images/{name}/manifest", tag = "images",
    params(("name" = String, Path, description = NAME)),
    responses(
        (status = 200, description = "The manifest", body = Object,
            content_type = "application/json"),
        (status = 404, description = "No such image", body = ErrorReply)))]
async fn image_manifest(
    State(d): State<App>,
    Path(name): Path<String>,
) -> Result<Response, OpError> {
    let bytes = blocking(move || d.image_manifest(&name)).await?;
    Ok(([(header::CONTENT_TYPE, "application/json")], bytes).into_response())
}

/// Stores a publisher's signature of the manifest (made client-side with the private key:
/// `{"algorithm":"ed25519","public_key":"ed25519:<hex>","signature":"<hex>"}`). It must
/// verify against the manifest; whether its key is trusted is checked at launch.
#[utoipa::path(put, path = "/1.0/images/{name}/signature", tag = "images",
    params(("name" = String, Path, description = NAME)),
    request_body(content = Object, description = "The signature"),
    responses(
        (status = 200, description = "Signed", body = Reply<ImageRecord>),
        (status = 400, description = "Not a signature of this manifest", body = ErrorReply),
        (status = 404, description = "No such image", body = ErrorReply)))]
async fn image_signature(
    State(d): State<App>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, OpError> {
    let image = blocking(move || d.image_sign(&name, &body)).await?;
    Ok(ok(StatusCode::OK, image))
}

/// Re-hashes every blob of the image: a bad one marks the image `corrupted` (unusable),
/// all good marks it `ok` again.
#[utoipa::path(post, path = "/1.0/images/{name}/verify", tag = "images",
    params(("name" = String, Path, description = NAME)),
    responses(
        (status = 200, description = "Each blob's result", body = Reply<VerifyReport>),
        (status = 404, description = "No such image", body = ErrorReply)))]
async fn image_verify(State(d): State<App>, Path(name): Path<String>) -> Result<Response, OpError> {
    let report = blocking(move || d.image_verify(&name)).await?;
    Ok(ok(StatusCode::OK, report))
}

/// The image as an archive that `POST /1.0/images` takes back.
#[utoipa::path(get, path = "/1.0/images/{name}/export", tag = "images",
    params(("name" = String, Path, description = NAME)),
    responses(
        (status = 200, description = "The archive", body = Vec<u8>,
            content_type = "application/x-tar"),
        (status = 404, description = "No such image", body = ErrorReply)))]
async fn image_export(State(d): State<App>, Path(name): Path<String>) -> Result<Response, OpError> {
    let (d2, n2) = (d.clone(), name.clone());
    blocking(move || d2.image_get(&n2)).await?;
    let (tx, rx) = mpsc::channel(DEPTH);
    tokio::task::spawn_blocking(move || {
        let mut w = ChannelWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(CHUNK),
        };
        // A failure mid-stream can only cut the body short: the client sees a broken
        // archive, which import refuses.
        if let Err(e) = d.image_export(&name, &mut w) {
            let _ = tx.blocking_send(Err(io::Error::other(e.to_string())));
        }
    });
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    Ok((
        [(header::CONTENT_TYPE, "application/x-tar")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// The body of `POST /1.0/images/aliases`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct AliasReq {
    /// The alias.
    name: String,
    /// The image it points at (moved if the alias exists).
    target: String,
}

/// Points an alias at an image (moving it if it exists).
#[utoipa::path(post, path = "/1.0/images/aliases", tag = "images",
    request_body = AliasReq,
    responses(
        (status = 200, description = "Done", body = Reply<Empty>),
        (status = 400, description = "Not a valid alias", body = ErrorReply),
        (status = 404, description = "No such image", body = ErrorReply),
        (status = 409, description = "An image has that name", body = ErrorReply)))]
async fn image_alias_set(
    State(d): State<App>,
    Extension(a): Extension<Authz>,
    body: Bytes,
) -> Result<Response, OpError> {
    let req: AliasReq = parse(&body)?;
    blocking(move || {
        // An alias names an image of its own project, which the user must manage (an
        // alias of that name, which would move, is of the same project).
        let project = a.target_project().map_err(OpError::BadRequest)?;
        let target = d
            .store()
            .image_find(&req.target)?
            .into_iter()
            .find(|(_, im)| im.project == project)
            .ok_or_else(|| crate::store::StoreError::NoImage(req.target.clone()))?;
        a.manages_image(&d, &target.0, &req.target)?;
        d.image_alias_set(&project, &req.name, &target.1.key)
    })
    .await?;
    Ok(ok(StatusCode::OK, Empty {}))
}

/// Removes an alias (not its image).
#[utoipa::path(delete, path = "/1.0/images/aliases/{name}", tag = "images",
    params(("name" = String, Path, description = "The alias")),
    responses(
        (status = 200, description = "Removed", body = Reply<Empty>),
        (status = 404, description = "No such alias", body = ErrorReply)))]
async fn image_alias_delete(
    State(d): State<App>,
    Path(name): Path<String>,
) -> Result<Response, OpError> {
    blocking(move || d.image_alias_delete(&name)).await?;
    Ok(ok(StatusCode::OK, Empty {}))
}

/// Removes every blob no image and no VM references, and the temp files of imports that
/// were cut short (a crash mid-import).
#[utoipa::path(post, path = "/1.0/images/prune", tag = "images",
    responses(
        (status = 200, description = "What was removed", body = Reply<PruneReport>),
        (status = 500, description = "A file could not be removed", body = ErrorReply)))]
async fn image_prune(State(d): State<App>) -> Result<Response, OpError> {
    let report = blocking(move || d.image_prune()).await?;
    Ok(ok(StatusCode::OK, report))
}
