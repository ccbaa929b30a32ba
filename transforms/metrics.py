"""One Beam Metrics namespace for every counter of the pipeline."""
NAMESPACE = "arc_activations"
