package cli

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"sigs.k8s.io/yaml"
)

// The one printer of every get and ls: -o table (the default), wide (more
// columns), json or yaml (the whole answer, for scripts).

// jsonOpts are the HTTP API's (shop/web): lowerCamelCase names, every field
// present, so a script finds the same keys whatever the values.
var jsonOpts = protojson.MarshalOptions{EmitUnpopulated: true}

// output is a command's -o flag.
type output struct{ format string }

func (o *output) register(c *cobra.Command) {
	c.Flags().StringVarP(&o.format, "output", "o", "table", "output format: table, wide, json or yaml")
	prev := c.PreRunE
	c.PreRunE = func(cmd *cobra.Command, args []string) error {
		switch o.format {
		case "table", "wide", "json", "yaml":
		default:
			return fmt.Errorf("-o %q: want table, wide, json or yaml", o.format)
		}
		if prev != nil {
			return prev(cmd, args)
		}
		return nil
	}
}

// column is one column of a table: its header, whether only -o wide shows
// it, and its cell for an item.
type column[T any] struct {
	name  string
	wide  bool
	value func(T) string
}

// printItems prints items as a table, or whole (the answer they came in:
// a proto message or a plain value) as JSON or YAML.
func printItems[T any](w io.Writer, o *output, whole any, items []T, cols []column[T]) error {
	switch o.format {
	case "json", "yaml":
		b, err := marshalJSON(whole)
		if err != nil {
			return err
		}
		if o.format == "yaml" {
			if b, err = yaml.JSONToYAML(b); err != nil {
				return err
			}
			_, err = w.Write(b)
			return err
		}
		_, err = fmt.Fprintf(w, "%s\n", b)
		return err
	}
	return printTable(w, o.format == "wide", items, cols)
}

func printTable[T any](w io.Writer, wide bool, items []T, cols []column[T]) error {
	var shown []column[T]
	for _, c := range cols {
		if wide || !c.wide {
			shown = append(shown, c)
		}
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	row := make([]string, len(shown))
	for i, c := range shown {
		row[i] = c.name
	}
	fmt.Fprintln(tw, strings.Join(row, "\t"))
	for _, it := range items {
		for i, c := range shown {
			row[i] = c.value(it)
		}
		fmt.Fprintln(tw, strings.Join(row, "\t"))
	}
	return tw.Flush()
}

// marshalJSON marshals v indented: a proto message with protojson (whose
// spacing varies from build to build on purpose, hence json.Indent), any
// other value with encoding/json.
func marshalJSON(v any) ([]byte, error) {
	m, ok := v.(proto.Message)
	if !ok {
		return json.MarshalIndent(v, "", "  ")
	}
	b, err := jsonOpts.Marshal(m)
	if err != nil {
		return nil, err
	}
	var out bytes.Buffer
	if err := json.Indent(&out, b, "", "  "); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}

// rawJSON is a proto message inside a plain value printed by printItems.
func rawJSON(m proto.Message) json.RawMessage {
	b, err := jsonOpts.Marshal(m)
	if err != nil {
		return json.RawMessage("null")
	}
	return b
}

// show prints the item a call returned (a get): show(cmd, &o,
// cols)(cl.GetVM(…)).
func show[T any](cmd *cobra.Command, o *output, cols []column[T]) func(T, error) error {
	return func(item T, err error) error {
		if err != nil {
			return err
		}
		return printItems(cmd.OutOrStdout(), o, item, []T{item}, cols)
	}
}
