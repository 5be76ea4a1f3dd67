"""Load-test scenarios (Locust files) and the SLO overrides of the release gate; shipped with opskit."""
