"""The driver and the Ray Tune side: plan, preflight, the Tuner, the trial entry point, progress and the demo.
The only folder that imports Ray; may import data/, fit/, store/; not results/ (the driver calls it from the CLI)."""
