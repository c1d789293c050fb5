"""Ray job entrypoints inside the package, for `ray job submit ... -- python -m asft_ray.jobs.prune CONFIG`."""
