"""The attack matrix of scripts/security_matrix.py, one module per area.

Each area module (broker.py, http.py, fleet.py, …) exposes

    def run(workdir: Path) -> list[Row]

which starts the real components it attacks (Mosquitto with the shipped ACL and TLS, a real
daemon with its agent, uvicorn on a loopback port) under `workdir`, runs each attack end to
end, stops everything it started, and returns one Row per attack. security_matrix.py runs
the areas and writes the table into docs/SECURITY.md.
"""
