//! `keystore-host decrypt`, `rotate` and `edit`: the commands that need a
//! file's plaintext back from KMS, which the key policy grants only to a
//! rotation principal (`keystore-host policy --rotator ARN`).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use keystore_host::secrets_file::Format;
use keystore_host::secrets_file::edit::{EditOptions, EditOutcome, default_editor, edit_file};
use keystore_host::secrets_file::encrypt::{Selection, write_private_atomically};
use keystore_host::secrets_file::location::{self, Location};
use keystore_host::secrets_file::rotate::{rotate_bytes, rotate_file};
use keystore_host::secrets_file::unseal::decrypt_bytes;

use crate::cli::encrypt::{AwsArgs, locate, report_update};

/// Arguments of `decrypt`.
#[derive(Debug, Args)]
pub struct DecryptArgs {
    /// The secrets file (`.env`, `.json`, `.yaml`/`.yml`), or an S3 object
    /// `s3://BUCKET/KEY` (read only: the plaintext goes to stdout or `-o`,
    /// never back to S3).
    #[arg(value_name = "FILE|s3://BUCKET/KEY")]
    pub file: PathBuf,
    /// The file's format when its name does not say.
    #[arg(long, value_name = "FORMAT")]
    pub format: Option<Format>,
    /// Required: this prints every secret of the file in plaintext.
    #[arg(long)]
    pub yes_print_secrets: bool,
    /// Write the plaintext here (mode 0600, atomically) instead of stdout.
    #[arg(short = 'o', long = "out", value_name = "FILE")]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub kms: AwsArgs,
}

/// Arguments of `rotate`.
#[derive(Debug, Args)]
pub struct RotateArgs {
    /// The secrets file, rewritten in place, or an S3 object
    /// `s3://BUCKET/KEY`, rewritten only if nobody changed it meanwhile
    /// (`If-Match`).
    #[arg(value_name = "FILE|s3://BUCKET/KEY")]
    pub file: PathBuf,
    /// The file's format when its name does not say.
    #[arg(long, value_name = "FORMAT")]
    pub format: Option<Format>,
    /// Move the file to this KMS key: the new data key is made under it
    /// and ENC[v1:kms:...] values are moved with ReEncrypt. Default: the
    /// file's current key.
    #[arg(long, value_name = "KEY")]
    pub key_id: Option<String>,
    #[command(flatten)]
    pub kms: AwsArgs,
}

/// Arguments of `edit`.
#[derive(Debug, Args)]
pub struct EditArgs {
    /// The secrets file, rewritten in place.
    pub file: PathBuf,
    /// The file's format when its name does not say.
    #[arg(long, value_name = "FORMAT")]
    pub format: Option<Format>,
    /// Also seal new plain strings matching this glob (repeatable;
    /// default: every plain string). Values sealed before are always
    /// sealed again.
    #[arg(long = "keys", value_name = "GLOB")]
    pub keys: Vec<String>,
    /// KMS key for a file without a data key yet (default: the file's).
    #[arg(long, value_name = "KEY")]
    pub key_id: Option<String>,
    #[command(flatten)]
    pub kms: AwsArgs,
}

/// Runs `decrypt`.
pub fn decrypt(args: DecryptArgs) -> anyhow::Result<ExitCode> {
    if !args.yes_print_secrets {
        eprintln!(
            "keystore-host decrypt prints every secret of {} in plaintext; add \
             --yes-print-secrets if that is what you want (nothing was read)",
            args.file.display()
        );
        return Ok(ExitCode::from(2));
    }
    if let Some(out) = &args.out
        && let (Ok(a), Ok(b)) = (args.file.canonicalize(), out.canonicalize())
        && a == b
    {
        anyhow::bail!(
            "-o {} is the sealed file itself; refusing to replace it with plaintext",
            out.display()
        );
    }
    let (location, format) = locate(&args.file, args.format)?;
    let label = PathBuf::from(location.to_string());
    let plaintext = args.kms.run(&location, async |client, s3| {
        let contents = location.read(s3.as_ref()).await?;
        Ok(decrypt_bytes(&client, &label, contents.bytes, format).await?)
    })?;
    match &args.out {
        Some(out) => write_private_atomically(out, plaintext.text.as_bytes())?,
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(plaintext.text.as_bytes())
                .and_then(|()| stdout.flush())
                .context("writing to stdout")?;
        }
    }
    eprintln!(
        "WARNING: {} secret value(s) of {} printed in plaintext{}",
        plaintext.revealed.len(),
        location,
        args.out
            .as_ref()
            .map(|o| format!(" to {} (mode 0600)", o.display()))
            .unwrap_or_default()
    );
    tracing::warn!(
        values = plaintext.revealed.len(),
        "break-glass decrypt printed plaintext"
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs `rotate`: on a local file, or on an S3 object read into memory and
/// written back only over the version read (`If-Match`).
pub fn rotate(args: RotateArgs) -> anyhow::Result<ExitCode> {
    let (location, format) = locate(&args.file, args.format)?;
    let label = PathBuf::from(location.to_string());
    let new_key = args.key_id.clone();
    let (report, updated) = args
        .kms
        .run(&location, async |client, s3| match &location {
            Location::File(path) => Ok((
                rotate_file(&client, path, format, new_key.as_deref()).await?,
                None,
            )),
            Location::S3(_) => {
                let (report, updated) = location::update(&location, s3.as_ref(), |bytes| async {
                    let (report, new) =
                        rotate_bytes(&client, &label, bytes, format, new_key.as_deref()).await?;
                    anyhow::Ok((report, Some(new)))
                })
                .await
                .with_context(|| format!("rotating {location}"))?;
                Ok((report, Some(updated)))
            }
        })?;
    for name in &report.resealed {
        println!("resealed {name}");
    }
    for name in &report.moved {
        println!("moved {name} (ReEncrypt)");
    }
    println!(
        "wrote keystore:file (file key {}, version {}, {} entries) under {}",
        report.written.file_id, report.written.version, report.written.entries, report.key_id
    );
    if let Some(updated) = &updated {
        report_update(&location, updated);
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `edit`.
pub fn edit(args: EditArgs) -> anyhow::Result<ExitCode> {
    let (location, _) = locate(&args.file, args.format)?;
    if let Location::S3(_) = location {
        anyhow::bail!(
            "edit works on a local file only, not {location} (nothing was read); copy the \
             object down (`aws s3 cp {location} FILE`, the copy holds only sealed values), edit \
             FILE, and upload it back; `rotate` and `decrypt` work on s3:// directly"
        );
    }
    let format = args.format.unwrap_or_else(|| Format::from_path(&args.file));
    let file = args.file.clone();
    let options = EditOptions {
        selection: Selection::patterns(args.keys),
        editor: default_editor(),
        base: None,
        key_id: args.key_id,
    };
    let outcome = args.kms.run(&location, async |client, _| {
        Ok(edit_file(&client, &file, format, &options).await?)
    })?;
    match outcome {
        EditOutcome::Unchanged => println!("{}: unchanged", args.file.display()),
        EditOutcome::Written { written, sealed } => {
            println!(
                "{}: {} value(s) sealed; wrote keystore:file (file key {}, version {}, {} \
                 entries)",
                args.file.display(),
                sealed.len(),
                written.file_id,
                written.version,
                written.entries
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
