"""`python -m infini_bench.report ...`: the report's command line (`infini_bench.report.main`)."""
from infini_bench.report import main

if __name__ == "__main__":
    main()
