"""One formatting layer for the CLI, the API and the reports: numbers and verdicts as text, csv, json."""
