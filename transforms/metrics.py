"""One Beam Metrics namespace for every counter of the pipeline."""
NAMESPACE = "arc_activations"

# CPU microseconds the statistics took on this host's threads (the writer's, and the extractor's share when they
# are made on the device), summed over the run.
STATISTICS_CPU_COUNTER = "statistics_cpu_us"
