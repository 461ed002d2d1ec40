"""The RLMT trainer: config, experience building, the step functions and the loop."""
