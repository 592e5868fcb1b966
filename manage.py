#!/usr/bin/env python
import sys

if __name__ == "__main__":
    from pairloop.manage import main

    main([sys.executable, *sys.argv])  # the child runs this script again, from this checkout
