"""Running any diffusers pipeline: load a folder or hub id offline, sample seeded images."""
