"""Local emulators of the services the bot talks to, shared by the tests, the benchmark and
the demo: :mod:`emulators.discord` (Discord's REST API, CDN and Gateway, for an unmodified
discord.py client) and :mod:`emulators.segmind` (Segmind's v1/v2 image API).

Both serve on 127.0.0.1 (a random free port) from the caller's event loop, need no network and
no credentials, and record everything they were asked, so tests can assert on it.
"""
