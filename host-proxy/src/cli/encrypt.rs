//! `keystore-host encrypt`: flags and AWS set-up around
//! [`keystore_host::secrets_file::file_key::encrypt`].

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use keystore_host::secrets_file::Format;
use keystore_host::secrets_file::encrypt::{RulesWritten, Selection};
use keystore_host::secrets_file::file_key::{self, KeyMode};
use keystore_host::secrets_file::location::{self, Location, S3Access, Updated};
use keystore_host::secrets_file::rules::read_rules;

/// Arguments of `encrypt`.
#[derive(Debug, Args)]
pub struct EncryptArgs {
    /// KMS key id, ARN or `alias/NAME` to encrypt under.
    #[arg(long)]
    pub key_id: String,
    /// The secrets file to encrypt in place: `.env`, `.json` or
    /// `.yaml`/`.yml` (by its name, or `--format`), or an S3 object
    /// `s3://BUCKET/KEY`, rewritten only if nobody changed it meanwhile.
    #[arg(value_name = "FILE|s3://BUCKET/KEY")]
    pub file: PathBuf,
    /// The file's format (`env`, `json`, `yaml`) when its name does not say.
    #[arg(long, value_name = "FORMAT")]
    pub format: Option<Format>,
    /// Encrypt only names matching this glob (`*`, `?`); repeatable. Names
    /// are variables, or dotted key paths in JSON/YAML (`db.*`,
    /// `servers.*.token`). Default: every plain string value.
    #[arg(long = "keys", value_name = "GLOB")]
    pub keys: Vec<String>,
    /// Access rules (YAML) to check, encrypt under the same key and write as
    /// the reserved `keystore:rules` entry (replacing the previous one).
    /// Without a rules entry only uid 0 may read.
    #[arg(long, value_name = "YAML")]
    pub rules: Option<PathBuf>,
    /// One KMS data key for the whole file (`GenerateDataKey`): values
    /// sealed as ENC[v1:fk:...] and a `keystore:file` record (MAC, version)
    /// so the enclave loads the file with one KMS call and refuses an
    /// altered or older file. The default for a file without
    /// ENC[v1:kms:...] values.
    #[arg(long, conflicts_with = "per_value_kms")]
    pub file_key: bool,
    /// One KMS `Encrypt` per value (ENC[v1:kms:...], at most 4 KiB each),
    /// the default for a file already written that way.
    #[arg(long)]
    pub per_value_kms: bool,
    #[command(flatten)]
    pub aws: AwsArgs,
}

/// Where KMS (and S3, for `s3://`) is and how to reach it: the flags of
/// every operator command that calls KMS (`encrypt`, `decrypt`, `rotate`,
/// `edit`).
#[derive(Debug, Args)]
pub struct AwsArgs {
    /// AWS region (default: the SDK's region chain).
    #[arg(long)]
    pub region: Option<String>,
    /// KMS endpoint URL, e.g. a KMS emulator.
    #[arg(long, value_name = "URL")]
    pub endpoint_url: Option<String>,
    /// Extra trusted CA certificates (PEM), for an emulator's test CA.
    #[arg(long, value_name = "PEM")]
    pub ca_bundle: Option<PathBuf>,
    #[command(flatten)]
    pub s3: S3Args,
}

impl AwsArgs {
    /// A KMS client (and an S3 client if `location` is an object) on a
    /// new single-threaded runtime, running `f`.
    pub fn run<T>(
        self,
        location: &Location,
        f: impl AsyncFnOnce(aws_sdk_kms::Client, Option<S3Access>) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let ca = read_ca_bundle(self.ca_bundle.as_deref())?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        runtime.block_on(async {
            let s3 = self.s3.access(location, self.region.clone()).await?;
            let sdk = keystore_host::aws::sdk_config(self.region, self.endpoint_url, ca).await?;
            f(aws_sdk_kms::Client::new(&sdk), s3).await
        })
    }
}

/// How an operator command reaches S3 for `s3://BUCKET/KEY`.
#[derive(Debug, Args)]
pub struct S3Args {
    /// An S3-compatible endpoint for `s3://...` (path-style addressing).
    #[arg(long, value_name = "URL")]
    pub s3_endpoint_url: Option<String>,
    /// Extra trusted CA certificates (PEM) for `--s3-endpoint-url`.
    #[arg(long, value_name = "PEM")]
    pub s3_ca_bundle: Option<PathBuf>,
    /// Bound on each S3 call, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub s3_timeout: u64,
}

impl S3Args {
    /// The S3 client for `location` if it is an object (the standard
    /// credential chain, `region`, these flags); `None` for a local file.
    pub async fn access(
        &self,
        location: &Location,
        region: Option<String>,
    ) -> anyhow::Result<Option<S3Access>> {
        if !matches!(location, Location::S3(_)) {
            return Ok(None);
        }
        let ca = read_ca_bundle(self.s3_ca_bundle.as_deref())?;
        Ok(Some(
            S3Access::connect(
                region,
                self.s3_endpoint_url.clone(),
                ca,
                Some(Duration::from_secs(self.s3_timeout.max(1))),
            )
            .await?,
        ))
    }
}

/// The PEM file of a `--ca-bundle`/`--s3-ca-bundle` flag, if given.
pub fn read_ca_bundle(path: Option<&Path>) -> anyhow::Result<Option<Vec<u8>>> {
    path.map(|path| {
        std::fs::read(path).with_context(|| format!("reading CA bundle {}", path.display()))
    })
    .transpose()
}

/// The file argument as a [`Location`] and its format (`--format`, else
/// from its name or object key).
pub fn locate(file: &Path, format: Option<Format>) -> anyhow::Result<(Location, Format)> {
    let location = Location::parse(&file.to_string_lossy())?;
    let format = format.unwrap_or_else(|| location.format());
    Ok((location, format))
}

/// Prints where the new contents went.
pub fn report_update(location: &Location, updated: &Updated) {
    if let Location::S3(_) = location {
        match updated {
            Updated::Unchanged => eprintln!("{location}: unchanged, nothing written"),
            Updated::Written(_) => eprintln!("{location}: written (only over the version read)"),
        }
    }
}

/// Encrypts the file (a local file, or an S3 object: read into memory and
/// written back only if it changed, and only over the version that was
/// read, `If-Match`) and prints what changed.
pub fn run(args: EncryptArgs) -> anyhow::Result<ExitCode> {
    let (location, format) = locate(&args.file, args.format)?;
    // Checked before any KMS call, so a mistake costs nothing.
    let rules = args.rules.as_deref().map(read_rules).transpose()?;
    let label = PathBuf::from(location.to_string());
    let (report, updated) = args.aws.run(&location, async |client, s3| {
        let selection = Selection::patterns(args.keys);
        let mode = match (args.file_key, args.per_value_kms) {
            (true, _) => KeyMode::FileKey,
            (_, true) => KeyMode::PerValueKms,
            _ => KeyMode::Auto,
        };
        let request = file_key::Request {
            client: &client,
            key_id: &args.key_id,
            label: &label,
            format,
            selection: &selection,
            rules: rules.as_ref(),
        };
        match &location {
            Location::File(path) => {
                let report = file_key::encrypt(
                    &client,
                    &args.key_id,
                    path,
                    format,
                    &selection,
                    rules.as_ref(),
                    mode,
                )
                .await?;
                anyhow::Ok((report, None))
            }
            Location::S3(_) => {
                let (report, updated) = location::update(&location, s3.as_ref(), |bytes| async {
                    anyhow::Ok(file_key::encrypt_bytes(&request, bytes, mode).await?)
                })
                .await
                .with_context(|| format!("encrypting {location}"))?;
                anyhow::Ok((report, Some(updated)))
            }
        }
    })?;
    for name in &report.encrypted {
        println!("encrypted {name}");
    }
    for name in &report.already_encrypted {
        println!("unchanged {name} (already ENC[...])");
    }
    for name in &report.skipped_empty {
        println!("skipped {name} (empty)");
    }
    match report.rules {
        Some(RulesWritten::Added { rules }) => {
            println!("encrypted keystore:rules ({rules} rule(s), added)")
        }
        Some(RulesWritten::Replaced { rules }) => {
            println!("encrypted keystore:rules ({rules} rule(s), replaced)")
        }
        None => {}
    }
    if let Some(written) = &report.file_key {
        println!(
            "wrote keystore:file (file key {}, version {}, {} entries)",
            written.file_id, written.version, written.entries
        );
    }
    eprintln!(
        "{}: {} encrypted, {} already encrypted, {} empty",
        location,
        report.encrypted.len(),
        report.already_encrypted.len(),
        report.skipped_empty.len()
    );
    if let Some(updated) = &updated {
        report_update(&location, updated);
    }
    Ok(ExitCode::SUCCESS)
}
