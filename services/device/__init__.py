"""Device tier: trains its modules on local data, pushes them, adopts what comes back."""
