"""The vault: a second repository on another machine that pulls the primary's sets (`restic copy`,
read only) and keeps them by its own time-based rules, so that nothing on the TMA Cloud host (its
settings, broker, signing key, the primary's password and keys) can erase them. It watches the
primary for signs of a compromise and says so (`worker.vault.watch`)."""
