"""The on-device agent: model store + runtime (core.py), HTTP app (app.py), hub sync (hubsync.py)."""
