"""The model bundle: the contract between the offline pipeline and the daemon.

    manifest.py   Manifest, GraphSpec, Bundle; verify_bundle (hashes + signature, before
                  anything is loaded) and write_bundle (atomic, signed)

A verified `Bundle` is handed on whole: engines, the generator and the fleet read its
manifest from that object, never from disk again.

May import: signing, atomic, errors.
"""
