//! `vme image ...`: the image repository from the command line. Imports stream an archive to
//! the daemon (built on the fly from a kernel, initrd and disk, or an existing `.tar`), with a
//! progress bar on a terminal; signing happens here, with the publisher's private key, and
//! only the signature goes to the daemon.

use crate::output::{self, Format};
use crate::{Api, http, out, reply};
use anyhow::{Context, Result, bail};
use clap::Subcommand;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;
use vme_api::{Arch, ByteSize};
use vme_image::manifest::{Amount, Boot, Resources, check_name};
use vme_image::{BlobRef, Digest, DiskFormat, Manifest, Role, Source, archive, qcow2, sign};

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Import an image: `import NAME --kernel K --initrd I [--disk D]` builds it from files,
    /// `import FILE.tar [--name NAME]` sends an archive made by `vme image export`.
    Import(Box<ImportArgs>),
    /// List the images.
    #[command(alias = "ls")]
    List {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Show an image: its manifest, signer, status.
    Info {
        name: String,
        #[arg(long, value_enum, default_value_t = Format::Json)]
        format: Format,
    },
    /// Delete an image (its blobs go too unless another image or a VM uses them).
    #[command(alias = "rm")]
    Delete { name: String },
    /// Point ALIAS at IMAGE (moving it if it exists), or remove it with --remove.
    Alias {
        alias: String,
        image: Option<String>,
        #[arg(long)]
        remove: bool,
    },
    /// Change an image's access: `--public true` makes it usable by every project,
    /// `--public false` by its own only (its project's operator or an admin).
    Set {
        name: String,
        #[arg(long, action = clap::ArgAction::Set)]
        public: bool,
    },
    /// Re-hash every blob of an image; fails if one is corrupted (and marks it unusable).
    Verify {
        name: String,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Write an image as an archive (`-` for stdout).
    Export { name: String, file: PathBuf },
    /// Remove blobs no image or VM uses, and leftovers of interrupted imports.
    Prune,
    /// Make a publisher signing key in FILE (mode 0600); prints its public key, for the
    /// daemon's trusted_keys.
    Keygen { file: PathBuf },
    /// Sign an image's manifest with a publisher key (the key never leaves this machine).
    Sign {
        name: String,
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
    },
}

/// `vme image import`'s arguments.
#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    /// The image's name (with --kernel), or the archive to import.
    pub source: String,
    /// With an archive: store it under this name instead of its manifest's.
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// A disk image, given to VMs made from the image: raw, or qcow2 (converted to raw by
    /// the daemon; the manifest records both digests).
    #[arg(long)]
    pub disk: Option<PathBuf>,
    /// The disk's format; auto tells qcow2 by its magic bytes, never by its name.
    #[arg(long, value_enum, default_value_t = DiskFormatArg::Auto)]
    pub disk_format: DiskFormatArg,
    /// Usable by every project (default: only by the project it is imported into).
    #[arg(long)]
    pub public: bool,
    /// The kernel command line VMs get by default.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// x86_64 (default) or riscv64.
    #[arg(long, default_value = "x86_64")]
    pub arch: String,
    #[arg(long, default_value = "linux")]
    pub os: String,
    #[arg(long = "os-version", default_value = "1")]
    pub os_version: String,
    /// Default vCPUs and memory of VMs made from it.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    #[arg(long, default_value = "256M")]
    pub memory: ByteSize,
    /// The least it runs with (default: the defaults).
    #[arg(long)]
    pub min_vcpus: Option<u32>,
    #[arg(long)]
    pub min_memory: Option<ByteSize>,
    /// KEY=VALUE (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskFormatArg {
    Auto,
    Raw,
    Qcow2,
}

fn image_segment(name: &str) -> Result<&str> {
    check_name(name).map_err(anyhow::Error::msg)?;
    Ok(name)
}

/// How long an import or export may go without a reply.
const TRANSFER: Duration = Duration::from_secs(24 * 3600);

pub fn run(api: &Api, cmd: ImageCmd) -> Result<()> {
    let print = |format: Format, v: &Value| -> Result<()> { out(&output::encode(format, v)?) };
    match cmd {
        ImageCmd::Import(args) => import(api, *args)?,
        ImageCmd::List { format } => {
            let images = api.call("GET", "/1.0/images", None)?;
            match format {
                Format::Table => out(&table(
                    images.as_array().map(Vec::as_slice).unwrap_or_default(),
                ))?,
                f => print(f, &images)?,
            }
        }
        ImageCmd::Info { name, format } => {
            let v = api.call(
                "GET",
                &format!("/1.0/images/{}", image_segment(&name)?),
                None,
            )?;
            print(format, &v)?;
        }
        ImageCmd::Delete { name } => {
            api.call(
                "DELETE",
                &format!("/1.0/images/{}", image_segment(&name)?),
                None,
            )?;
            println!("{name}: deleted");
        }
        ImageCmd::Alias {
            alias,
            image,
            remove,
        } => match (image, remove) {
            (None, true) => {
                let path = format!("/1.0/images/aliases/{}", image_segment(&alias)?);
                api.call("DELETE", &path, None)?;
                println!("alias {alias}: removed");
            }
            (Some(image), false) => {
                let body = json!({"name": alias, "target": image});
                api.call("POST", "/1.0/images/aliases", Some(body))?;
                println!("alias {alias} -> {image}");
            }
            _ => bail!("give ALIAS IMAGE to set an alias, or ALIAS --remove to remove one"),
        },
        ImageCmd::Set { name, public } => {
            let path = format!("/1.0/images/{}/access", image_segment(&name)?);
            let v = api.call("PUT", &path, Some(json!({ "public": public })))?;
            let shown = if v["public"].as_bool() == Some(true) {
                "public"
            } else {
                "private"
            };
            println!(
                "image {name}: {shown} (project {})",
                v["project"].as_str().unwrap_or("?")
            );
        }
        ImageCmd::Verify { name, format } => {
            let path = format!("/1.0/images/{}/verify", image_segment(&name)?);
            let r = api.call_within("POST", &path, None, TRANSFER)?;
            match format {
                Format::Table => {
                    let rows: Vec<Vec<String>> = r["blobs"]
                        .as_array()
                        .map(Vec::as_slice)
                        .unwrap_or_default()
                        .iter()
                        .map(|b| {
                            let s = |k: &str| b[k].as_str().unwrap_or("").to_string();
                            let ok = if b["ok"] == json!(true) {
                                "ok".into()
                            } else {
                                s("error")
                            };
                            vec![s("role"), s("sha256"), ok]
                        })
                        .collect();
                    out(&output::grid(&["ROLE", "SHA256", "RESULT"], &rows))?;
                }
                f => print(f, &r)?,
            }
            if r["status"] != "ok" {
                bail!("image {name} is corrupted: it will not be launched until it verifies");
            }
        }
        ImageCmd::Export { name, file } => {
            let path = format!("/1.0/images/{}/export", image_segment(&name)?);
            let to_stdout = file == Path::new("-");
            let tmp = file.with_extension("partial");
            let mut sink: Box<dyn std::io::Write> = if to_stdout {
                Box::new(std::io::stdout().lock())
            } else {
                Box::new(std::io::BufWriter::new(
                    std::fs::File::create(&tmp)
                        .with_context(|| format!("cannot create {}", tmp.display()))?,
                ))
            };
            let got = http::download(&api.ep, &path, &mut sink).map_err(|e| api.unreachable(e))?;
            sink.flush()?;
            drop(sink);
            match got {
                Ok(n) if !to_stdout => {
                    std::fs::rename(&tmp, &file)
                        .with_context(|| format!("cannot write {}", file.display()))?;
                    eprintln!(
                        "{name}: exported {} to {}",
                        crate::human(n as f64),
                        file.display()
                    );
                }
                Ok(_) => {}
                Err((code, text)) => {
                    let _ = std::fs::remove_file(&tmp);
                    reply(code, &text)?;
                }
            }
        }
        ImageCmd::Prune => {
            let r = api.call_within("POST", "/1.0/images/prune", None, TRANSFER)?;
            println!(
                "removed {} blobs ({}) and {} temp files",
                r["blobs_removed"],
                crate::human(r["bytes_freed"].as_f64().unwrap_or(0.0)),
                r["temp_files_removed"]
            );
        }
        ImageCmd::Keygen { file } => {
            let key = sign::keygen(&file).map_err(anyhow::Error::msg)?;
            println!("{key}");
            eprintln!(
                "vme: the signing key is in {} (keep it secret); trust its public key above by \
                 adding it to vmed's config: trusted_keys = [\"{key}\"] (fingerprint {})",
                file.display(),
                key.fingerprint()
            );
        }
        ImageCmd::Sign { name, key } => {
            let key = sign::SecretKey::load(&key).map_err(anyhow::Error::msg)?;
            let seg = image_segment(&name)?;
            let (code, manifest) = http::request_within(
                &api.ep,
                "GET",
                &format!("/1.0/images/{seg}/manifest"),
                "",
                TRANSFER,
            )
            .map_err(|e| api.unreachable(e))?;
            if code != 200 {
                reply(code, &manifest)?;
            }
            let sig = key.sign(manifest.as_bytes());
            let body: Value = serde_json::to_value(&sig)?;
            api.call("PUT", &format!("/1.0/images/{seg}/signature"), Some(body))?;
            println!("{name}: signed by key {}", key.public().fingerprint());
        }
    }
    Ok(())
}

/// `vme image import`: from files (a manifest and archive made on the fly) or an archive.
fn import(api: &Api, a: ImportArgs) -> Result<()> {
    let public = if a.public { "&public=true" } else { "" };
    let ImportArgs {
        source,
        name,
        kernel,
        initrd,
        disk,
        disk_format,
        cmdline,
        arch,
        os,
        os_version,
        vcpus,
        memory,
        min_vcpus,
        min_memory,
        labels,
        public: _,
    } = a;
    let Some(kernel) = kernel else {
        if initrd.is_some() || disk.is_some() {
            bail!(
                "--initrd and --disk need --kernel: `vme image import NAME --kernel K --initrd I`"
            );
        }
        let path = Path::new(&source);
        let f = std::fs::File::open(path).with_context(|| {
            format!(
                "cannot open the archive {source}: give an image archive, or a name and \
                 --kernel to build one"
            )
        })?;
        let len = f.metadata()?.len();
        let mut url = "/1.0/images".to_string();
        if let Some(n) = &name {
            url.push_str(&format!("?name={}", image_segment(n)?));
        }
        if !public.is_empty() {
            url.push_str(if name.is_some() {
                "&public=true"
            } else {
                "?public=true"
            });
        }
        upload(api, &url, len, Box::new(f), &source)?;
        return Ok(());
    };
    if name.is_some() {
        bail!("--name is for archives; with --kernel the first argument is the name");
    }
    let default = Amount { vcpus, memory };
    let minimum = Amount {
        vcpus: min_vcpus.unwrap_or(vcpus),
        memory: min_memory.unwrap_or(memory),
    };
    let files = [
        (Role::Kernel, Some(kernel)),
        (Role::Initrd, initrd),
        (Role::Disk, disk),
    ];
    let mut blobs = Vec::new();
    let mut opened = Vec::new();
    for (role, path) in files {
        let Some(path) = path else { continue };
        let f = std::fs::File::open(&path)
            .with_context(|| format!("cannot open the {} {}", role.as_str(), path.display()))?;
        let (sha256, size) = vme_image::hash_reader(&f)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut b = BlobRef {
            role,
            sha256,
            size,
            source: None,
        };
        if role == Role::Disk && disk_is_qcow2(&f, &path, disk_format)? {
            // The archive carries the qcow2 file, which the daemon converts; the manifest
            // names the raw disk it must convert to, so it is computed here the same way.
            if std::io::stderr().is_terminal() {
                eprintln!(
                    "vme: reading the qcow2 disk {} to learn its raw digest",
                    path.display()
                );
            }
            let (raw, raw_size) = qcow2::convert(&f, None, qcow2::DEFAULT_MAX_VIRTUAL_SIZE)
                .with_context(|| format!("cannot import the disk {}", path.display()))?;
            b.source = Some(Source {
                format: DiskFormat::Qcow2,
                sha256: std::mem::replace(&mut b.sha256, raw),
                size: std::mem::replace(&mut b.size, raw_size),
            });
        }
        blobs.push(b);
        opened.push(path);
    }
    let mut label_map = BTreeMap::new();
    for l in labels {
        let (k, v) = l
            .split_once('=')
            .with_context(|| format!("--label {l:?} is not KEY=VALUE"))?;
        label_map.insert(k.to_string(), v.to_string());
    }
    let m = Manifest {
        schema_version: Manifest::schema_for(&blobs),
        name: source.clone(),
        os,
        version: os_version,
        architecture: arch.parse::<Arch>().map_err(|e| anyhow::anyhow!("{e}"))?,
        boot: Boot::Direct { cmdline },
        resources: Resources { default, minimum },
        labels: label_map,
        blobs: blobs.clone(),
    };
    m.check(u64::MAX).map_err(anyhow::Error::msg)?;
    let bytes = m.to_bytes();
    // One entry per distinct blob (two roles may share one file's content); a converted
    // disk is sent as its source.
    let mut parts: Vec<(Digest, u64, Box<dyn Read + Send>)> = Vec::new();
    for (b, path) in blobs.iter().zip(&opened) {
        let (d, size) = match &b.source {
            Some(src) => (&src.sha256, src.size),
            None => (&b.sha256, b.size),
        };
        if parts.iter().any(|(x, _, _)| x == d) {
            continue;
        }
        let f =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        parts.push((d.clone(), size, Box::new(f)));
    }
    let (len, r) = archive::stream(&bytes, None, parts)?;
    upload(
        api,
        &format!("/1.0/images?name={source}{public}"),
        len,
        r,
        &source,
    )?;
    Ok(())
}

/// Whether the disk `f` is to be converted from qcow2.
fn disk_is_qcow2(f: &std::fs::File, path: &Path, format: DiskFormatArg) -> Result<bool> {
    let magic = qcow2::is_qcow2(f).with_context(|| format!("cannot read {}", path.display()))?;
    match format {
        DiskFormatArg::Raw => Ok(false),
        DiskFormatArg::Auto => Ok(magic),
        DiskFormatArg::Qcow2 if magic => Ok(true),
        DiskFormatArg::Qcow2 => bail!(
            "{} is not a qcow2 file (it does not start with QFI\\xfb): give --disk-format raw \
             for a raw disk",
            path.display()
        ),
    }
}

/// Streams an archive to the daemon with a progress bar on a terminal.
fn upload(api: &Api, path: &str, len: u64, r: Box<dyn Read + Send>, what: &str) -> Result<()> {
    let bar = std::io::stderr().is_terminal().then(|| {
        let p = indicatif::ProgressBar::new(len);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})",
        ) {
            p.set_style(style.progress_chars("=> "));
        }
        p.set_message(format!("importing {what}"));
        p
    });
    let mut reader: Box<dyn Read> = match &bar {
        Some(b) => Box::new(b.wrap_read(r)),
        None => r,
    };
    let (code, text) = http::upload(
        &api.ep,
        path,
        "application/x-tar",
        len,
        &mut reader,
        TRANSFER,
    )
    .map_err(|e| api.unreachable(e))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let r = reply(code, &text)?;
    println!(
        "{}: imported ({}; {} blobs stored, {} already present)",
        r["image"]["name"].as_str().unwrap_or("?"),
        crate::human(r["image"]["size"].as_f64().unwrap_or(0.0)),
        r["blobs_stored"],
        r["blobs_deduplicated"]
    );
    Ok(())
}

/// `vme image list` as a table.
fn table(images: &[Value]) -> String {
    let rows: Vec<Vec<String>> = images
        .iter()
        .map(|i| {
            let m = &i["manifest"];
            let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
            let aliases: Vec<String> = i["aliases"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(s)
                .collect();
            let project = match i["public"].as_bool() {
                Some(true) => format!("{} (public)", s(&i["project"])),
                _ => s(&i["project"]),
            };
            vec![
                s(&i["name"]),
                project,
                format!("{} {}", s(&m["os"]), s(&m["version"])),
                s(&m["architecture"]),
                crate::human(i["size"].as_f64().unwrap_or(0.0)),
                i["signed_by"].as_str().unwrap_or("unsigned").to_string(),
                s(&i["status"]),
                if aliases.is_empty() {
                    "-".into()
                } else {
                    aliases.join(",")
                },
            ]
        })
        .collect();
    output::grid(
        &[
            "NAME",
            "PROJECT",
            "OS",
            "ARCH",
            "SIZE",
            "SIGNED BY",
            "STATUS",
            "ALIASES",
        ],
        &rows,
    )
}

/// `vme publish VM IMAGE`.
pub fn publish(api: &Api, vm: &str, image: &str, format: Format) -> Result<()> {
    let path = format!("/1.0/vms/{}/publish", image_segment(vm)?);
    let r = api.call_within("POST", &path, Some(json!({"image": image})), TRANSFER)?;
    match format {
        Format::Table => {
            let rows: Vec<Vec<String>> = r["scrubbed"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|i| {
                    let s = |k: &str| i[k].as_str().unwrap_or("").to_string();
                    vec![s("path"), s("action")]
                })
                .collect();
            out(&output::grid(&["SCRUBBED", "ACTION"], &rows))?;
            println!("VM {vm} published as image {image}");
        }
        f => out(&output::encode(f, &r)?)?,
    }
    Ok(())
}
