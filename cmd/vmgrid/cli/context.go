package cli

import (
	"cmp"
	"fmt"
	"strings"

	"github.com/spf13/cobra"
)

func contextCmd(g *globals) *cobra.Command {
	return group(&cobra.Command{
		Use:   "context",
		Short: "List, pick, show and remove the grids of the client config file",
		Long: `List, pick, show and remove contexts: the grids of the client config file
(--config, env VMGRID_CONFIG, default $XDG_CONFIG_HOME/vmgrid/config.yaml),
each with the addresses of its shop, image server, data server and compute
servers, tokens and TLS files. vmgrid up writes one and makes it current.
A client verb takes a setting from its flag, else its environment
variable, else the current context (or --context NAME), else the default.`,
	}, contextListCmd(g), contextUseCmd(g), contextShowCmd(g), contextRmCmd(g))
}

// namedContext is a context as ls and show print it: tokens never leave
// the config file.
type namedContext struct {
	Name    string `json:"name"`
	Current bool   `json:"current"`
	clientContext
}

func (c *clientConfig) named(name string) namedContext {
	cx := *c.Contexts[name]
	for _, t := range []*string{&cx.Token, &cx.OperatorToken} {
		if *t != "" {
			*t = "REDACTED"
		}
	}
	return namedContext{Name: name, Current: name == c.Current, clientContext: cx}
}

var contextColumns = []column[namedContext]{
	{name: "CURRENT", value: func(n namedContext) string {
		if n.Current {
			return "*"
		}
		return ""
	}},
	{name: "NAME", value: func(n namedContext) string { return n.Name }},
	{name: "SHOP", value: func(n namedContext) string { return dash(n.Shop) }},
	{name: "IMAGE-SERVER", value: func(n namedContext) string { return dash(n.ImageServer) }},
	{name: "DATA-SERVER", value: func(n namedContext) string { return dash(n.DataServer) }},
	{name: "COMPUTE-SERVERS", wide: true, value: func(n namedContext) string { return dash(strings.Join(n.ComputeServers, ",")) }},
	{name: "TLS-CA", wide: true, value: func(n namedContext) string { return dash(n.TLSCA) }},
}

// withConfig runs fn on the client config file and saves it after when
// fn changed it (also what it changed before failing: rm of a, b, nosuch).
func withConfig(g *globals, fn func(c *clientConfig) (changed bool, err error)) error {
	path := g.configPath()
	c, err := loadConfig(path)
	if err != nil {
		return err
	}
	changed, err := fn(c)
	if changed {
		err = cmp.Or(err, c.save(path))
	}
	return err
}

func contextListCmd(g *globals) *cobra.Command {
	var o output
	c := &cobra.Command{Use: "ls", Aliases: []string{"list"}, Short: "List the contexts (* marks the current one)", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return withConfig(g, func(c *clientConfig) (bool, error) {
				all := []namedContext{}
				for _, n := range c.names() {
					all = append(all, c.named(n))
				}
				return false, printItems(cmd.OutOrStdout(), &o, all, all, contextColumns)
			})
		}}
	o.register(c)
	return c
}

func contextUseCmd(g *globals) *cobra.Command {
	return &cobra.Command{Use: "use NAME", Short: "Make a context the current one", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withConfig(g, func(c *clientConfig) (bool, error) {
				if _, err := c.get(args[0]); err != nil {
					return false, err
				}
				c.Current = args[0]
				fmt.Fprintf(cmd.OutOrStdout(), "current context: %s\n", args[0])
				return true, nil
			})
		}}
}

func contextShowCmd(g *globals) *cobra.Command {
	var o output
	c := &cobra.Command{Use: "show [NAME]", Aliases: []string{"get"}, Short: "Show a context (default: the current one; tokens redacted)", Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withConfig(g, func(c *clientConfig) (bool, error) {
				name := cmp.Or(g.contextName, c.Current)
				if len(args) == 1 {
					name = args[0]
				}
				if name == "" {
					return false, fmt.Errorf("no current context (vmgrid context use NAME, or vmgrid up)")
				}
				if _, err := c.get(name); err != nil {
					return false, err
				}
				n := c.named(name)
				return false, printItems(cmd.OutOrStdout(), &o, n, []namedContext{n}, contextColumns)
			})
		}}
	o.register(c)
	return c
}

func contextRmCmd(g *globals) *cobra.Command {
	return &cobra.Command{Use: "rm NAME...", Aliases: []string{"delete"}, Short: "Remove contexts", Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withConfig(g, func(c *clientConfig) (bool, error) {
				err := each(cmd, args, "removed", func(name string) error {
					if _, err := c.get(name); err != nil {
						return err
					}
					delete(c.Contexts, name)
					if c.Current == name {
						c.Current = ""
					}
					return nil
				})
				return true, err
			})
		}}
}
