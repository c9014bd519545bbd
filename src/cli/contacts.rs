//! `natter contacts`: save, list and remove peers reachable with `--to`.

use anyhow::{Context, Result};
use clap::Subcommand;
use natter::contacts::Contacts;
use natter::identity::{config_dir, PublicKey};

#[derive(Subcommand)]
pub enum ContactsCommand {
    /// Save a peer under NAME: the one you last paired with by code, or the
    /// public key given.
    Add {
        name: String,
        /// The peer's public key in hex (`natter id` prints it).
        key: Option<String>,
    },
    /// List saved contacts with their fingerprints.
    List,
    /// Forget a contact.
    Remove { name: String },
}

pub fn run(command: ContactsCommand) -> Result<()> {
    let home = config_dir()?;
    let mut contacts = Contacts::load(&home)?;
    match command {
        ContactsCommand::Add { name, key } => {
            let key = match key {
                Some(hex) => PublicKey::from_hex(&hex)
                    .map_err(|_| anyhow::anyhow!("{hex:?} is not a public key (64 hex digits)"))?,
                None => contacts
                    .last_paired()
                    .context("no peer paired yet: connect with a code first, or give the key")?,
            };
            contacts.add(&name, key)?;
            contacts.save()?;
            println!("saved {name}: {}", key.fingerprint());
        }
        ContactsCommand::List => {
            for (name, key) in contacts.iter() {
                println!("{name}\t{}", key.fingerprint());
            }
        }
        ContactsCommand::Remove { name } => {
            contacts.remove(&name)?;
            contacts.save()?;
            println!("removed {name}");
        }
    }
    Ok(())
}
