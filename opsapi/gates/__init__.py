"""SLO gates: query templates, measurement providers, and the pure judgement."""
