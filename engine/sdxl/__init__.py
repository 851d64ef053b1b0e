"""The SDXL model family: Fooocus's pipeline (resolve, conditioning, samplers, denoiser, refiner
swap), model loading and the demo model. A second family (Flux) sits beside this package and plugs
into the core through the same ``Runner`` protocol (engine.core.jobs)."""
