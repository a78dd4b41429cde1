"""Looking at an output: verify it, aggregate its run, draw the report, print the summary."""
