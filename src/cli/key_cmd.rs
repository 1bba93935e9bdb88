//! `pitr key rotate`: argument handling and output.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::audit_cmd::Changes;
use super::exit::{Code, Failure};
use crate::config::Settings;
use crate::key_source::KeySource;
use crate::repo::Repository;
use crate::storage::Storage;

#[derive(Args, Debug)]
pub struct KeyArgs {
    #[command(subcommand)]
    pub action: KeyAction,
}

#[derive(Subcommand, Debug)]
pub enum KeyAction {
    /// Replace the passphrase: the data key is rewrapped under the new one, no WAL or backup
    /// object is rewritten. The current key comes from the usual sources
    /// (--encryption-key-file / --encryption-key-command, PITR_ENCRYPTION_KEY_*, [encryption]).
    /// Afterwards only the new key opens the repository. Safe to run again after an
    /// interruption; two rotations at once cannot both succeed.
    Rotate(RotateArgs),
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct RotateArgs {
    /// File holding the new passphrase (trailing newline stripped).
    #[arg(long, value_name = "FILE")]
    pub new_key_file: Option<PathBuf>,
    /// Command (run with sh -c) that prints the new passphrase.
    #[arg(long, value_name = "CMD")]
    pub new_key_command: Option<String>,
}

pub async fn key(
    storage: Storage,
    settings: &Settings,
    args: KeyArgs,
    changes: &mut Changes,
) -> Result<Code, Failure> {
    let KeyAction::Rotate(rotate) = args.action;
    let new = match (rotate.new_key_file, rotate.new_key_command) {
        (Some(path), _) => KeySource::File(path),
        (None, Some(command)) => KeySource::Command(command),
        (None, None) => unreachable!("clap requires one of the two"),
    };
    // Opening checks the current key (or says the repository needs one).
    let repo = Repository::open(storage, settings.write.clone()).await?;
    if repo.key_generation().is_none() {
        return Err(Failure::new(
            Code::Input,
            format!("the repository at {} is not encrypted: there is no key to rotate", repo.location()),
            Some("a repository is encrypted when it is created with a key; encrypting an existing one means a new repository and a new backup".into()),
        ));
    }
    let rotation = repo.rotate_key(&new).await?;
    changes
        .created
        .push(format!("key generation {}", rotation.to));
    if rotation.from != rotation.to {
        changes
            .deleted
            .push(format!("key generation {}", rotation.from));
    }
    if rotation.resumed {
        println!(
            "finished an interrupted rotation: key generation {} is the only one; only the new key opens {}",
            rotation.to,
            repo.location()
        );
    } else {
        println!(
            "rotated the encryption key of {}: key generation {} -> {}; only the new key opens it now",
            repo.location(),
            rotation.from,
            rotation.to
        );
    }
    println!("update the key file or key command in archive_command, restore_command and the pitr configuration");
    Ok(Code::Ok)
}
