"""The in-sandbox half of the code sandbox.

Every module here is standard-library only and imports no `reward_models` code: `launcher.py` runs as
`python -I -S reward_models/jail/launcher.py` (no site-packages, no environment) and puts this folder on
sys.path itself. The trusted side (`reward_models.sandbox`) starts it; tests import `harness` helpers.
"""
