"""The experiment folder or URI: its files and names, who may write it (the lock) and how much room it needs.
The floor every other folder stands on: imports only the package root; no torch, no Ray."""
