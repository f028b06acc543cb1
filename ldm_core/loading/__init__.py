"""From files to ready-to-run models: the loader, and the loaded parts (DiffusionModel,
TextEncoder, VAE, Checkpoint) with the few operations each offers."""
