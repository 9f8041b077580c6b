"""``pdserve plan calibrate``: time the real engine's steps on this machine and fit the step cost
models (linear and roofline) to them."""
