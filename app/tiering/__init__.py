"""Where a group's values live and what that costs (issue 14): the cost report, caches and moves between tiers."""
