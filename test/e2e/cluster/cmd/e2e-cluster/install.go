package main

import (
	"context"
	"errors"
	"flag"
)

func install(ctx context.Context, work string, fs *flag.FlagSet, args []string) error {
	fs.Parse(args)
	return errors.New("not yet")
}
