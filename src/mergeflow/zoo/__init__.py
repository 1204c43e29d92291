"""Where the base model, the experts and their data come from: the toy zoo, the hub, local dirs."""
